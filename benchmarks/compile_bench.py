"""The layer under torch.compile and autocast on one GPU (issue 23): correctness against eager
and the time of one call.

    python3 benchmarks/compile_bench.py --preset issue23,dsv3 --json compile_n1.json

One process, a world of one, routing given (each token k of the E experts, uniformly at
random), `MoEConfig.max_tokens` set (what tracing needs). Per preset and wave split:
- forward: eager, the hand-made CUDA graph of it, `torch.compile(fullgraph=True)` (default
  mode: Inductor) and `mode="reduce-overhead"` (Inductor's CUDA graphs); a training step
  (forward and backward): eager and compiled (default; reduce-overhead on a fresh layer, whose
  first call is compiled, three steps first). Each row: host ms to issue the call and device
  ms (median of 10 after 3 warm-ups, `host_launches.timed`), and the compiled output's and
  gradients' relative error against eager's;
- autocast: fp32 parameters under `torch.autocast("cuda", torch.bfloat16)` against the bf16
  layer (forward, and a training step), eager; the forward also in eval mode, where the
  casts are kept between calls (`MoEConfig.weight_cache`).
Presets: `issue23` is the shape issue 23 found broken (H 1024, E 16, k 4, T 512); the others
are `overlap.py`'s per-rank shapes of one GPU (`host_launches.build`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import provenance  # noqa: E402
from benchmarks.host_launches import build, timed  # noqa: E402
from benchmarks.overlap import PRESETS  # noqa: E402

ISSUE23 = dict(H=1024, F=512, experts=16, k=4, T=512, dtype="bfloat16")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def step_grads(layer, fn, x, idx, tw):
    """y and the gradients (x, w1, w2) of one training step through `fn`."""
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = fn(xg, topk_idx=idx, topk_weights=tw)
    y.float().square().mean().backward()
    return [y.detach(), xg.grad, layer.experts.w1.grad, layer.experts.w2.grad]


def hand_graph(layer, x, idx, tw):
    """The forward captured in a CUDA graph by hand (after a warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        layer(x, topk_idx=idx, topk_weights=tw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        layer(x, topk_idx=idx, topk_weights=tw)
    return graph


def rows_of(name: str, P: dict, split: str, W: int, device) -> list:
    layer, x, idx, tw = build(P, W, device, split)
    label = f"{name}/{split} W={W}"
    out = []

    def row(call, fn, err=None):
        host, dev = timed(fn)
        out.append(dict(preset=name, split=split, W=W, call=call, host_ms=host, device_ms=dev, rel_err=err))
        print(f"{label:22} {call:24} host {host:7.3f} ms  device {dev:7.3f} ms" +
              (f"  rel err vs eager {err:.2e}" if err is not None else ""), flush=True)

    with torch.no_grad():
        want = layer(x, topk_idx=idx, topk_weights=tw)
        row("fwd eager", lambda: layer(x, topk_idx=idx, topk_weights=tw))
        graph = hand_graph(layer, x, idx, tw)
        row("fwd CUDA graph (hand)", graph.replay)
        del graph
        for mode in (None, "reduce-overhead"):
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, mode=mode)
            got = compiled(x, topk_idx=idx, topk_weights=tw).clone()
            row(f"fwd compiled {mode or 'default'}", lambda: compiled(x, topk_idx=idx, topk_weights=tw),
                rel(got, want))
    eager = step_grads(layer, layer, x, idx, tw)
    row("fwd+bwd eager", lambda: step_grads(layer, layer, x, idx, tw))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    got = step_grads(layer, compiled, x, idx, tw)
    row("fwd+bwd compiled default", lambda: step_grads(layer, compiled, x, idx, tw),
        max(rel(a, b) for a, b in zip(got, eager)))
    # a fresh layer (its first call compiled: what it keeps is made inside cudagraph trees'
    # warm-up) in reduce-overhead, training steps against the eager layer's
    torch._dynamo.reset()
    fresh = build(P, W, device, split)[0]
    with torch.no_grad():
        fresh.load_state_dict(layer.state_dict())
    compiled = torch.compile(fresh, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # cudagraph trees' warm-up, recording, replay: the last one's results are compared
        got = step_grads(fresh, compiled, x, idx, tw)
    row("fwd+bwd compiled reduce-overhead, fresh layer", lambda: step_grads(fresh, compiled, x, idx, tw),
        max(rel(a, b) for a, b in zip(got, eager)))
    del fresh, compiled
    torch._dynamo.reset()
    # autocast: the fp32 layer under bf16 autocast against this bf16 layer
    fp32 = build(P, W, device, split)[0].float()
    with torch.no_grad():
        fp32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})

    def autocast_call():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fp32(x.float(), topk_idx=idx, topk_weights=tw)

    with torch.no_grad():
        err = rel(autocast_call(), want)
        row("fwd autocast (fp32 params)", autocast_call, err)
        fp32.eval()  # inference: the casts are kept between calls while the weights are unchanged
        row("fwd autocast (fp32 params), eval: casts kept", autocast_call, rel(autocast_call(), want))
        fp32.train()

    def autocast_step():
        fp32.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fp32(x.float(), topk_idx=idx, topk_weights=tw)
        y.float().square().mean().backward()

    row("fwd+bwd autocast (fp32 params)", autocast_step)
    del layer, fp32
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="issue23,dsv3")
    ap.add_argument("--runs", default="tokens:1,experts:2", help="split:W pairs")
    ap.add_argument("--json", default="compile_n1.json")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    rows = []
    for name in args.preset.split(","):
        P = dict(ISSUE23) if name == "issue23" else dict(PRESETS[name])
        if "local_experts" in P:  # one rank holds what a rank of two would (the per-rank work of 2 GPUs)
            P["experts"] = P["local_experts"]
        for run in args.runs.split(","):
            split, W = run.split(":")
            try:
                rows += rows_of(name, P, split, int(W), device)
            except Exception as e:  # noqa: BLE001 - reported in the record, the other rows still run
                print(f"{name}/{split} W={W}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
                rows.append(dict(preset=name, split=split, W=int(W), error=f"{type(e).__name__}: {str(e)[:2000]}"))
                torch._dynamo.reset()
    provenance.dump(args.json, rows=rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
