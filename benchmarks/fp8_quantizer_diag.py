"""Where the Triton per-group column quantizer and its torch path differ (r42b: not bitwise on
an H100, bitwise in Triton's interpreter). One process, CUDA (or Triton's interpreter on CPU,
TRITON_INTERPRET=1):

    python3 benchmarks/fp8_quantizer_diag.py --rows 4096 --cols 1024 --experts 8 --json diag.json

For bf16 Gaussian rows in `--experts` groups of random sizes: how many scales and FP8 bytes
(in the groups' rows) differ, and for the first differing bytes the input, its scale, the
quotient in fp32 and float64, and both FP8 values; then the same for inputs built to sit in
e4m3's subnormal range and on rounding ties.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ep.kernels.fp8 import FP8, quantize_columns_per_group_torch  # noqa: E402


def compare(name: str, x: torch.Tensor, offs: torch.Tensor, show: int) -> dict:
    from ep.kernels.triton_fp8 import quantize_columns_per_group_triton  # (CPU: TRITON_INTERPRET=1)

    aq, sa, po = quantize_columns_per_group_triton(x, offs)
    wq, ws, _ = quantize_columns_per_group_torch(x, offs)
    out = dict(case=name, shape=list(x.shape), groups=offs.tolist(), scales_differ=int((sa != ws).sum()))
    starts = [0] + offs.tolist()[:-1]
    pstarts = [0] + po.tolist()[:-1]
    differ, shown = 0, []
    for e, (a, b) in enumerate(zip(starts, offs.tolist())):
        n = b - a
        got, want = aq[:, pstarts[e]:pstarts[e] + n], wq[:, pstarts[e]:pstarts[e] + n]
        bad = (got.view(torch.uint8) != want.view(torch.uint8)).nonzero()
        differ += bad.shape[0]
        for c, t in bad[:max(0, show - len(shown))].tolist():
            v = x[a + t, c].float()
            s = ws[e * x.shape[1] + c]
            shown.append(dict(expert=e, row=a + t, col=c, x=v.item(), scale=s.item(), triton_scale=sa[e * x.shape[1] + c].item(),
                              q_fp32=(v / s).item(), q_f64=(v.double() / s.double()).item(),
                              triton=got[c, t].float().item(), torch=want[c, t].float().item()))
    out.update(bytes_differ=differ, bytes=int(x.numel()), first=shown)
    print(f"{name}: scales differ {out['scales_differ']} of {sa.numel()}, FP8 bytes differ {differ} of {x.numel()}",
          flush=True)
    for d in shown:
        print("   ", d, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--show", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randint(0, args.rows + 1, (args.experts - 1,), generator=g)).values
    offs = torch.cat([cuts, torch.tensor([args.rows])]).to(device=device, dtype=torch.int32)
    x = torch.randn(args.rows, args.cols, generator=g).to(device=device, dtype=torch.bfloat16)
    cases = [compare("gaussian", x, offs, args.show)]
    tiny = x.clone()
    tiny[1:] *= 2.0 ** -12  # one big row per column sets the scale: the rest lands among e4m3's subnormals
    cases.append(compare("subnormal range", tiny, offs, args.show))
    ties = (torch.randint(0, 16, x.shape, generator=g).float() * 0.0625 + 1.03125).to(device=device, dtype=torch.bfloat16)
    for start in [0] + cuts.tolist():  # each group's scale exactly 1: the quotients are the bf16 values, many
        ties[min(start, args.rows - 1)] = 448.0  # of them e4m3 ties
    cases.append(compare("ties", ties, offs, args.show))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           torch=torch.__version__, fp8=str(FP8), cases=cases), f, indent=1)


if __name__ == "__main__":
    main()
