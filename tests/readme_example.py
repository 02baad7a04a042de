"""The README's "Using the layer" example, run verbatim, then checked against the float64 reference.

    python3 tests/readme_example.py [--json out.json]   # one process, no launcher; on a GPU if there is one

The example's code block is read from README.md and executed as it stands (so it cannot
drift from what runs). Then the one-process layer it built is checked on the example's own
device, forward and every gradient (x, router, w1, w2), against `tests/reference.py` in
float64, for both wave splits, W in {1, 2, "auto"} and the dtypes the device runs the
experts in (float32; on CUDA also bfloat16): the case issue 14 found crashing. Used by
`tests/test_readme.py` (CPU, in CI) and `scripts/gpu_bench.sh` (one GPU, plain python3).
Exits non-zero on a failure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ep  # noqa: E402
from tests.cases import rel_err  # noqa: E402
from tests.reference import reference_moe_by_expert, reference_routing  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def readme_example() -> str:
    """The first python block under the README's "## Using the layer" heading."""
    text = open(README).read()
    section = text[text.index("## Using the layer"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if match is None:
        raise AssertionError("README.md: no python block under '## Using the layer'")
    return match.group(1)


def run_example() -> dict:
    """Execute the example as a script would; return its names (layer, x, y, ...)."""
    names: dict = {"__name__": "__readme__"}
    exec(compile(readme_example(), "README.md (Using the layer)", "exec"), names)  # noqa: S102 - our own README
    return names


def check_layer(base: ep.ExpertParallelMoE, x: torch.Tensor, dtype: torch.dtype, **cfg_args) -> dict:
    """A copy of `base` with other knobs, in `dtype`, against the float64 reference on `x`."""
    cfg = base.config
    layer = ep.ExpertParallelMoE(ep.MoEConfig(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden, num_experts=cfg.num_experts,
                                              top_k=cfg.top_k, **cfg_args))
    layer.load_state_dict(base.state_dict())
    layer = layer.to(device=x.device, dtype=dtype)
    xs = x.detach().to(dtype).requires_grad_(True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device=x.device, dtype=dtype)
    y = layer(xs)
    y.backward(dy)
    d64 = lambda t: t.detach().to(dtype).double()  # noqa: E731  the layer's rounded values
    xr, rr, w1r, w2r = (d64(t).requires_grad_(True) for t in (x, layer.router.weight, layer.experts.w1, layer.experts.w2))
    idx, wr = reference_routing(xr, rr, cfg.top_k)
    with torch.no_grad():
        picked, _ = layer.router(xs.detach())
    same = (picked.sort(dim=1).values == idx.sort(dim=1).values).all(dim=1)  # near-ties may flip in low precision
    yr = reference_moe_by_expert(xr, w1r, w2r, idx, wr)
    yr.backward(d64(dy))
    errs = dict(y=rel_err(y.detach()[same], yr.detach()[same]))
    if bool(same.all()):  # gradients mix tokens: compare them only when every token routed alike
        errs.update(dx=rel_err(xs.grad, xr.grad), dw1=rel_err(layer.experts.w1.grad, w1r.grad),
                    dw2=rel_err(layer.experts.w2.grad, w2r.grad), drouter=rel_err(layer.router.weight.grad, rr.grad))
    return dict(errs=errs, tokens_routed_alike=int(same.sum()), tokens=int(same.numel()),
                ok=max(errs.values()) < TOL[dtype] and int(same.sum()) >= 0.99 * same.numel())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    names = run_example()
    base, x = names["layer"], names["x"]
    print(f"README example ran on {x.device} (group {names['group']}, auto picked W={names['auto'].num_waves})", flush=True)
    dtypes = [torch.float32] + ([torch.bfloat16] if x.is_cuda else [])
    results, failed = [], 0
    for split, W, dtype in itertools.product(("tokens", "experts"), (1, 2, "auto"), dtypes):
        try:
            got = check_layer(base, x, dtype, num_waves=W, wave_split=split)
        except Exception as e:  # noqa: BLE001 - a crash is a failed case (issue 14 was one)
            got = dict(errs={}, ok=False, error=repr(e)[:400])
        failed += not got["ok"]
        results.append(dict(split=split, W=W, dtype=str(dtype), **got))
        print(f"one process on {x.device}: {split:7} W={W!s:4} {str(dtype):14} {'ok' if got['ok'] else 'FAIL'} "
              + " ".join(f"{k}={v:.1e}" for k, v in got["errs"].items()) + (f" {got['error']}" if "error" in got else ""),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(x.device), torch=torch.__version__, cases=results, failed=failed), f, indent=2)
    print(f"{len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
