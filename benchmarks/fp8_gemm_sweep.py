"""The FP8 grouped products and quantizers at the presets' per-rank shapes on one GPU, against
bf16 `torch._grouped_mm` on the same rows: the blockwise Triton product's tile configs (weights
K-major, as the layer holds them), the rowwise `torch._scaled_grouped_mm` (`fp8_scaling="rows"`;
promoted and with fast accumulation, `fp8_fast_accum`, each one's error against float64), and
each quantizer the FP8 paths run per call (activations, SwiGLU's output, weights); the
backward's data products (`dy @ w^T`, bf16 against `fp8_backward="data"`'s rowwise FP8) and
weight products (`x^T @ dy` per expert, bf16 against both operands in FP8, `fp8_wgrad`: not
in the layer yet, timed to see whether it pays).

    python3 benchmarks/fp8_gemm_sweep.py --shapes dsv3,wide,decode --json fp8_sweep.json

Balanced rows (`SHAPES`: dsv3 32 experts x 1024 rows, H 7168, F 2048; wide 16 x 1536, H 4096,
F 1408; decode 32 x 32, H 7168, F 2048), linear1 (K H, N 2F) and linear2 (K F, N H); device
ms per op (`ep.kernels.timing.device_ms`: 10 calls queued behind a device-side sleep after 3
warm-ups, so short ops are not paced by the host). The blockwise product's tile configs are
swept at the first shape only (the others: its first config). Also the pack before dispatch,
bf16 rows against FP8 dispatch's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import provenance  # noqa: E402
from ep.kernels.timing import device_ms  # noqa: E402
from ep.kernels import gather_rows  # noqa: E402
from ep.kernels.fp8 import (FP8, fp8_grouped_mm, quantize_rows, quantize_rowwise, quantize_weight_blocks,  # noqa: E402
                            quantize_weight_columns, swiglu_quantize)
from ep.kernels.swiglu import swiglu  # noqa: E402
from ep.kernels.triton_fp8 import fp8_grouped_mm_triton  # noqa: E402

CONFIGS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 5)]
SHAPES = {"dsv3": (32, 1024, 7168, 2048, 8), "wide": (16, 1536, 4096, 1408, 6), "decode": (32, 32, 7168, 2048, 8)}
"""preset -> (local experts, rows per expert, H, F, k): `benchmarks/overlap.py`'s per-rank shapes."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="dsv3", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--json", default="fp8_sweep.json")
    args = ap.parse_args()
    out = []
    for i, shape in enumerate(args.shapes.split(",")):
        out += sweep(shape, CONFIGS if i == 0 else CONFIGS[:1])
    provenance.dump(args.json, rows=out)
    return 0


def timed(fn) -> float:
    """Device ms of one call of `fn` (`ep.kernels.timing.device_ms`: 10 queued, 3 warm-ups)."""
    return device_ms(fn, reps=10, warmup=3)


def pack(shape: str, T: int, H: int, E: int, k: int, dev) -> list:
    """The pack before dispatch (one rank: every token one row), its rows in bf16 against FP8
    dispatch's (each token quantized in the pack kernel)."""
    from ep.layout import RowLayout
    from ep.plan import WaveMap, pack_rows, sender_plan

    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    idx = torch.rand(T, E, device=dev).argsort(dim=1)[:, :k].contiguous()
    tw = torch.rand(T, k, device=dev)
    plan = sender_plan(idx, tw, E, 1, WaveMap(1), WaveMap(1).capacity(T), T)
    out = []
    for what, data_dtype in (("bf16 rows", None), ("FP8 rows (quantized in the pack)", FP8)):
        layout = RowLayout(H, k, torch.bfloat16, data_dtype)
        rows = layout.empty(plan.row_token.shape[0], dev)
        ms = timed(lambda: pack_rows(x, tw, plan, layout, rows))
        out.append(dict(product=f"{shape} pack", kind=what, ms=ms, row_bytes=layout.width * 2))
        print(f"{shape} pack of {T} tokens, {what}: {ms:.3f} ms ({layout.width * 2} bytes a row)", flush=True)
    return out


def rowwise_products(name: str, xq, xs, wq, ws, offs: torch.Tensor, flops: int) -> list:
    """The rowwise `torch._scaled_grouped_mm`, its partial sums promoted to fp32 along K
    (the default) and with fast accumulation (`fp8_fast_accum`): ms, and each one's error
    against the float64 product of the same FP8 operands, over the first two experts
    (relative Frobenius norm; what the accumulation alone costs: both read the same bytes)."""
    from ep.kernels.fp8 import fp8_grouped_mm_emulated

    two = int(offs[1])
    exact = fp8_grouped_mm_emulated(xq[:two], xs[:two], wq[:2], ws[:2], offs[:2], torch.float64,
                                    acc_dtype=torch.float64)
    out = []
    for fast in (False, True):
        kind = "fp8 rowwise _scaled_grouped_mm" + (" fast accum" if fast else "")
        ms = timed(lambda: fp8_grouped_mm(xq, xs, wq, ws, offs, fast_accum=fast))
        got = fp8_grouped_mm(xq, xs, wq, ws, offs, fast_accum=fast)[:two].double()
        err = ((got - exact).norm() / exact.norm()).item()
        out.append(dict(product=name, kind=kind, ms=ms, tflops=flops / ms / 1e9, rel_err_vs_float64=err))
        print(f"{name} {kind}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s, vs float64 of the same FP8 operands "
              f"{err:.2e}", flush=True)
    return out


def data_gradient(name: str, w: torch.Tensor, offs: torch.Tensor, flops: int) -> list:
    """The product's data gradient `dy @ w^T` (`fp8_backward="data"`): bf16 against FP8 rowwise
    (`ep.experts.quantize_transposed_weight`; promoted, and with fast accumulation: what it would
    save in the backward), with the gradient rows' quantization and the weights' (per row of w)
    timed apart."""
    from ep.experts import quantize_transposed_weight

    E, K, N = w.shape
    dy = torch.randn(offs[-1].item(), N, device=w.device, dtype=torch.bfloat16)
    wt = quantize_transposed_weight(w)
    dq, ds = quantize_rowwise(dy)
    ops = {"data gradient bf16 _grouped_mm": (lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=offs), True),
           "data gradient fp8 rowwise _scaled_grouped_mm": (lambda: fp8_grouped_mm(dq, ds, wt.q, wt.scale, offs), True),
           "data gradient fp8 rowwise _scaled_grouped_mm fast accum":
               (lambda: fp8_grouped_mm(dq, ds, wt.q, wt.scale, offs, fast_accum=True), True),
           "data gradient: quantize the gradient rows per row": (lambda: quantize_rowwise(dy), False),
           f"data gradient: quantize weights {tuple(w.shape)} per row (w^T's columns)":
               (lambda: quantize_transposed_weight(w), False)}
    out = []
    for what, (fn, product) in ops.items():
        ms = timed(fn)
        out.append(dict(product=name, kind=what, ms=ms, **(dict(tflops=flops / ms / 1e9) if product else {})))
        print(f"{name} {what}: {ms:.3f} ms" + (f" {flops / ms / 1e9:.0f} TFLOP/s" if product else ""), flush=True)
    return out


def weight_gradient(name: str, x: torch.Tensor, N: int, offs: torch.Tensor, flops: int) -> list:
    """The product's weight gradient `dw[e] = x[rows of e]^T @ dy[rows of e]`: bf16
    `torch._grouped_mm` (the layer's, `ep.kernels.grouped_mm_wgrad`) against both operands in
    FP8 (`ep.kernels.fp8.fp8_wgrad`: one scale per column of each expert's rows, transposed,
    then `torch._scaled_grouped_mm`'s 2d-2d form; promoted and with fast accumulation), the
    two quantizations timed apart; each FP8 one's error against float64 of the bf16 operands
    over the first two experts (relative Frobenius norm)."""
    from ep.kernels.fp8 import fp8_wgrad, quantize_columns_per_group, quantize_columns_per_group_torch

    dy = torch.randn(x.shape[0], N, device=x.device, dtype=torch.bfloat16)
    two = int(offs[1])
    exact = torch.stack([x[a:b].double().t() @ dy[a:b].double() for a, b in ((0, int(offs[0])), (int(offs[0]), two))])
    ops = {"weight gradient bf16 _grouped_mm": (lambda: torch._grouped_mm(x.t(), dy, offs=offs), True),
           "weight gradient fp8 (quantize both + 2d-2d _scaled_grouped_mm)": (lambda: fp8_wgrad(x, dy, offs), True),
           "weight gradient fp8 fast accum": (lambda: fp8_wgrad(x, dy, offs, fast_accum=True), True),
           f"weight gradient: quantize x {tuple(x.shape)} per column per expert, transposed":
               (lambda: quantize_columns_per_group(x, offs), False),
           f"weight gradient: quantize dy {tuple(dy.shape)} per column per expert, transposed":
               (lambda: quantize_columns_per_group(dy, offs), False)}
    aq, sa, po = quantize_columns_per_group(x, offs)
    bq, sb, _ = quantize_columns_per_group(dy, offs)
    wq, ws, _ = quantize_columns_per_group_torch(x, offs)  # the Triton kernel against the torch path, bit for bit
    end = int(po[-1])
    same = bool(torch.equal(aq[:, :end].view(torch.uint8), wq[:, :end].view(torch.uint8)) and torch.equal(sa, ws))
    print(f"{name} weight gradient: the Triton quantizer bitwise the torch path's: {same}", flush=True)
    del wq, ws
    ops["weight gradient: the 2d-2d FP8 product alone"] = (
        lambda: torch._scaled_grouped_mm(aq, bq.t(), sa, sb, offs=po, out_dtype=torch.bfloat16), True)
    out = [dict(product=name, kind="weight gradient: Triton quantizer bitwise the torch path's", ok=same)]
    for what, (fn, product) in ops.items():
        try:
            ms = timed(fn)
        except Exception as e:  # noqa: BLE001 - a form this torch does not run, reported
            out.append(dict(product=name, kind=what, error=str(e)[:300]))
            print(f"{name} {what}: {type(e).__name__} {str(e)[:200]}", flush=True)
            continue
        row = dict(product=name, kind=what, ms=ms, **(dict(tflops=flops / ms / 1e9) if product else {}))
        if product and "alone" not in what:
            got = fn()[:2].double()
            row["rel_err_vs_float64"] = ((got - exact).norm() / exact.norm()).item()
        out.append(row)
        print(f"{name} {what}: {ms:.3f} ms" + (f" {flops / ms / 1e9:.0f} TFLOP/s" if product else "")
              + (f", vs float64 {row['rel_err_vs_float64']:.2e}" if "rel_err_vs_float64" in row else ""), flush=True)
    return out


def sweep(shape: str, configs) -> list:
    """Every product and quantizer at one preset's per-rank shape."""
    dev = torch.device("cuda", 0)
    E, rows, H, F, k = SHAPES[shape]
    out = pack(shape, E * rows // k, H, E, k, dev)
    for name, K, N in (("linear1", H, 2 * F), ("linear2", F, H)):
        name = f"{shape} {name}"
        x = torch.randn(E * rows, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, K, N, device=dev, dtype=torch.bfloat16) / K ** 0.5
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * rows
        flops = 2 * E * rows * K * N
        ms = timed(lambda: torch._grouped_mm(x, w, offs=offs))
        out.append(dict(product=name, kind="bf16 _grouped_mm", ms=ms, tflops=flops / ms / 1e9))
        print(f"{name} bf16 torch._grouped_mm: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        wk, ws = quantize_weight_blocks(w, k_major=True)
        xq, xs = quantize_rows(x)
        for cfg in configs:
            try:
                ms = timed(lambda: fp8_grouped_mm_triton(xq, xs, wk, ws, offs, torch.bfloat16, cfg))
                row = dict(product=name, kind="fp8 triton K-major", config=cfg, ms=ms, tflops=flops / ms / 1e9)
                print(f"{name} fp8 blocks triton K-major {cfg}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile here, reported
                row = dict(product=name, kind="fp8 triton K-major", config=cfg, error=str(e)[:300])
                print(f"{name} fp8 triton K-major {cfg}: {type(e).__name__} {str(e)[:200]}", flush=True)
            out.append(row)
        rq, rs = quantize_weight_columns(w)
        xr, xrs = quantize_rowwise(x)
        out += rowwise_products(name, xr, xrs, rq, rs, offs, flops)
        index = torch.randperm(E * rows, device=dev)
        count = torch.tensor(E * rows, device=dev)
        ops = {f"quantize weights {tuple(w.shape)} 128x128 blocks": lambda: quantize_weight_blocks(w, k_major=True),
               f"quantize weights {tuple(w.shape)} per column": lambda: quantize_weight_columns(w)}
        if name.endswith("linear1"):  # its input: the rows gathered by item
            ops.update({"gather rows bf16 (the bf16 path)": lambda: gather_rows(x, index, count),
                        "gather + quantize rows 1x128": lambda: quantize_rows(gather_rows(x, index, count)),
                        "gather + quantize rows per row": lambda: quantize_rowwise(x, index=index, rows=count)})
        else:  # its input: SwiGLU of linear1's output [rows, 2K]
            h = torch.randn(E * rows, 2 * K, device=dev, dtype=torch.bfloat16)
            ops.update({"swiglu bf16 (the bf16 path)": lambda: swiglu(h),
                        "swiglu + quantize 1x128": lambda: swiglu_quantize(h),
                        "swiglu + quantize per row": lambda: swiglu_quantize(h, rowwise=True)})
        for what, fn in ops.items():
            ms = timed(fn)
            out.append(dict(product=name, kind=what, ms=ms))
            print(f"{name} {what}: {ms:.3f} ms", flush=True)
        out += data_gradient(name, w, offs, flops)
        out += weight_gradient(name, x, N, offs, flops)
        del x, w, xq, wk, rq, xr
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
