"""The experts: SwiGLU MLPs over a contiguous range of local experts, forward and backward.

Rows arrive grouped by expert (`counts[e]` rows for expert e). linear1 is `h = x @ w1`;
linear2 is SwiGLU (`a = silu(gate) * up`, gate = columns `[:F]` of h, up = `[F:]`, both
clamped first when a `swiglu_limit` is given) then `a @ w2`.
Backward is written out by hand so the pipeline can run it wave by wave. With FP8 experts
(`MoEConfig.expert_dtype`) the forward products run in FP8 (`linear1_fp8`, `linear2_fp8`;
both, or one: `MoEConfig.fp8_products`) and the backward is the same one, from the saved
activations; with `MoEConfig.fp8_backward="data"` its data products `dz @ w2^T` and
`dh @ w1^T` run in FP8 too (`quantize_transposed_weight`: the weights' transposes in the
rowwise recipe), the weight gradients in the layer's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .kernels import gather_rows, grouped_mm, grouped_mm_wgrad
from .kernels.fp8 import (Fp8Experts, Fp8Weight, fp8_grouped_mm, gather_quantized, quantize_rows, quantize_rowwise,
                          quantize_weight_blocks, quantize_weight_columns, requantize_weight_columns,
                          swiglu_quantize)
from .kernels.swiglu import swiglu, swiglu_backward_weighted


class Experts(nn.Module):
    """This rank's experts.

    Parameters:
        w1: `[E_local, H, 2F]`, columns `[:F]` the gate and `[F:]` the up projection.
        w2: `[E_local, F, H]`.
    """

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden, 2 * ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.w1.shape[1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[1] ** -0.5)


def _rows_in_use(counts: Optional[Sequence[int]], offs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Without host counts, the rows in use are `offs[-1]` on the device (buffers sized by a
    bound: the kernels skip the rows past it)."""
    return offs[-1] if counts is None and offs is not None and offs.numel() else None


def linear1(x_IH: torch.Tensor, w1_EH2F: torch.Tensor, counts: Sequence[int], offs: Optional[torch.Tensor] = None,
            expected_rows: Optional[float] = None, index: Optional[torch.Tensor] = None,
            rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`h = x @ w1[e]` per expert -> `[I, 2F]` (SwiGLU is applied by linear2). `expected_rows`:
    rows per expert the caller expects (picks the GPU kernel, `ep.kernels.grouped_mm`); with
    `index` the rows are `x[index]` (`rows`: a 0-d device count of those in use)."""
    return grouped_mm(x_IH, w1_EH2F, counts, offs, expected_rows, index, rows)


def linear2(
    h_I2F: torch.Tensor, w2_EFH: torch.Tensor, counts: Sequence[int], offs: Optional[torch.Tensor] = None,
    swiglu_limit: Optional[float] = None, expected_rows: Optional[float] = None,
) -> torch.Tensor:
    """`o = swiglu(h) @ w2[e]` per expert -> `[I, H]` (h clamped by `swiglu_limit` when given)."""
    return grouped_mm(swiglu(h_I2F, swiglu_limit, _rows_in_use(counts, offs)), w2_EFH, counts, offs, expected_rows)


def linear2_backward(
    dz_IH: torch.Tensor,
    h_I2F: torch.Tensor,
    weight_I: torch.Tensor,
    w2_EFH: torch.Tensor,
    counts: Sequence[int],
    offs: Optional[torch.Tensor] = None,
    swiglu_limit: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `z = weight * (swiglu(h) @ w2)` for the gradient `dz` of each item's row
    (`swiglu_limit`: the forward's).

    Returns:
        dh `[I, 2F]` (h's dtype, SwiGLU's backward included), dw2 `[E, F, H]`,
        dweight `[I]` (at least fp32).
    """
    dh_I2F, wa_IF, dweight_I, _ = linear2_backward_data(dz_IH, h_I2F, weight_I, w2_EFH, counts, offs, swiglu_limit)
    dw2 = grouped_mm_wgrad(wa_IF, dz_IH, counts, offs)  # (w * a)^T @ dz
    return dh_I2F, dw2, dweight_I


def linear1_backward(
    dh_I2F: torch.Tensor,
    x_IH: torch.Tensor,
    w1_EH2F: torch.Tensor,
    counts: Sequence[int],
    offs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of `h = x @ w1[e]`. Returns dx `[I, H]` and dw1 `[E, H, 2F]`."""
    dx_IH = linear1_backward_data(dh_I2F, w1_EH2F, counts, offs)
    dw1 = grouped_mm_wgrad(x_IH, dh_I2F, counts, offs)
    return dx_IH, dw1


def _data_product(dy_IN: torch.Tensor, w_EKN: torch.Tensor, wt: Optional[Fp8Weight], counts: Optional[Sequence[int]],
                  offs: Optional[torch.Tensor], fast_accum: bool = False,
                  dy_q: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """`dy @ w[e]^T` per expert -> `[I, K]` in dy's dtype: in the layer's dtype, or with `wt`
    (`quantize_transposed_weight(w)`) in FP8, dy's rows in use quantized with one scale each
    (or given so: `dy_q`, `ep.kernels.fp8.gather_quantize_rowwise`'s; `fast_accum`:
    `fp8_grouped_mm`'s)."""
    if wt is None:
        return grouped_mm(dy_IN, w_EKN.transpose(1, 2), counts, offs)
    q, scale = dy_q if dy_q is not None else quantize_rowwise(dy_IN, rows=_rows_in_use(counts, offs))
    return fp8_grouped_mm(q, scale, wt.q, wt.scale, offs, dy_IN.dtype, counts, fast_accum=fast_accum)


def linear2_backward_data(
    dz_IH: torch.Tensor,
    h_I2F: torch.Tensor,
    weight_I: torch.Tensor,
    w2_EFH: torch.Tensor,
    counts: Optional[Sequence[int]],
    offs: Optional[torch.Tensor] = None,
    swiglu_limit: Optional[float] = None,
    w2t: Optional[Fp8Weight] = None,
    fast_accum: bool = False,
    dz_q: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    quantize_dh: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """The data part of `linear2_backward`: dh `[I, 2F]`, wa `[I, F]` (weight * swiglu(h),
    so that dw2 = wa^T @ dz, left to the caller), dweight `[I]`, and with `quantize_dh` dh's
    rows quantized per row in the same kernel (for `linear1_backward_data`'s `dh_q`; else
    None). With `w2t` (`quantize_transposed_weight(w2)`) `dz @ w2^T` runs in FP8 (`fast_accum`:
    `fp8_grouped_mm`'s; `dz_q`: dz's rows already quantized per row, as `_data_product` takes them)."""
    g_IF = _data_product(dz_IH, w2_EFH, w2t, counts, offs, fast_accum, dz_q)  # dz @ w2^T
    dh, wa, dweight, *dh_q = swiglu_backward_weighted(g_IF, h_I2F, weight_I, swiglu_limit, _rows_in_use(counts, offs),
                                                      quantize_dh)
    return dh, wa, dweight, tuple(dh_q) if dh_q else None


def linear1_backward_data(
    dh_I2F: torch.Tensor, w1_EH2F: torch.Tensor, counts: Optional[Sequence[int]], offs: Optional[torch.Tensor] = None,
    w1t: Optional[Fp8Weight] = None, fast_accum: bool = False,
    dh_q: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """The data part of `linear1_backward`: dx `[I, H]` (dw1 = x^T @ dh is left to the caller).
    With `w1t` (`quantize_transposed_weight(w1)`) the product runs in FP8 (`fast_accum`:
    `fp8_grouped_mm`'s; `dh_q`: dh's rows already quantized per row, `linear2_backward_data`'s)."""
    return _data_product(dh_I2F, w1_EH2F, w1t, counts, offs, fast_accum, dh_q)


def quantize_expert_weight(w: torch.Tensor, scaling: str = "blocks") -> Fp8Weight:
    """One stack of expert weights `[E, K, N]` in FP8 (`MoEConfig.fp8_scaling`: "blocks",
    128x128 blocks; "rows", one scale per output column), made once per call or kept
    (`ep.weight_cache`): every wave's products share it. Held K-major (an `[E, K, N]` view of
    `[E, N, K]` memory): Hopper's FP8 tensor-core product takes its B operand along K (r37a:
    N-major B ran the Triton product ~9x slower than bf16)."""
    if scaling == "rows":
        return Fp8Weight(*quantize_weight_columns(w.detach()))
    return Fp8Weight(*quantize_weight_blocks(w.detach(), k_major=True))


def quantize_transposed_weight(w_EKN: torch.Tensor) -> Fp8Weight:
    """`w^T` `[E, N, K]` in the rowwise recipe, for the backward's data product `dy @ w^T`: one
    scale per column of `w^T`, i.e. per row of `w` (over its N values), so w's own memory,
    quantized row by row (`quantize_rowwise`: one pass), is already the K-major layout the
    product reads. Made once per backward or kept (`ep.weight_cache`)."""
    E, K, N = w_EKN.shape
    q, scale = quantize_rowwise(w_EKN.detach().reshape(E * K, N))
    return Fp8Weight(q.view(E, K, N).transpose(1, 2), scale.view(E, K))


def quantize_experts(w1_EH2F: torch.Tensor, w2_EFH: torch.Tensor, scaling: str = "blocks") -> Fp8Experts:
    """Both stacks of experts in FP8 (`quantize_expert_weight`)."""
    return Fp8Experts(quantize_expert_weight(w1_EH2F, scaling), quantize_expert_weight(w2_EFH, scaling))


def in_recipe(experts: Fp8Experts, scaling: str) -> Fp8Experts:
    """FP8 experts of either recipe (e.g. a checkpoint's 128x128 blocks) in `scaling`'s, laid
    out as the products read them: blocks K-major as they are, or requantized per column for
    "rows" (a second rounding, once)."""
    def convert(w: Fp8Weight) -> Fp8Weight:
        if scaling == "rows":
            return w if w.rowwise else Fp8Weight(*requantize_weight_columns(w.q, w.scale))
        if w.rowwise:
            raise ValueError("FP8 experts with per-column scales cannot serve fp8_scaling='blocks'")
        return Fp8Weight(w.q.transpose(1, 2).contiguous().transpose(1, 2), w.scale)  # K-major (a view when it is)
    return Fp8Experts(*(None if w is None else convert(w) for w in (experts.w1, experts.w2)))


def linear1_fp8(x_MH: torch.Tensor, w1: Fp8Weight, offs: torch.Tensor, index: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None, x_scale: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None, fast_accum: bool = False) -> torch.Tensor:
    """`linear1` in FP8: the item rows (`x[index]`) quantized as the weights' recipe wants
    (1x128 tiles, or one scale per row), times the weights, fp32 accumulation (`fast_accum`:
    `fp8_grouped_mm`'s) -> `[I, 2F]` in x's dtype. With `x_scale`, x is quantized already (FP8
    dispatch's 1x128 tiles: gathered as they are, or for the rowwise recipe quantized again
    per row; `out_dtype` given)."""
    out_dtype = out_dtype or x_MH.dtype
    if w1.rowwise:
        xq, xs = quantize_rowwise(x_MH, index=index, rows=rows, x_scale=x_scale)
    elif x_scale is not None:
        xq, xs = gather_quantized(x_MH, x_scale, index, rows)
    else:
        xq, xs = quantize_rows(gather_rows(x_MH, index, rows) if index is not None else x_MH)
    return fp8_grouped_mm(xq, xs, w1.q, w1.scale, offs, out_dtype, fast_accum=fast_accum)


def linear2_fp8(h_I2F: torch.Tensor, w2: Fp8Weight, offs: torch.Tensor,
                swiglu_limit: Optional[float] = None, fast_accum: bool = False) -> torch.Tensor:
    """`linear2` in FP8: SwiGLU fused with its quantization (1x128 tiles, or one scale per row
    for the rowwise recipe), times the weights -> `[I, H]` in h's dtype."""
    aq, a_scale = swiglu_quantize(h_I2F, swiglu_limit, rowwise=w2.rowwise)
    return fp8_grouped_mm(aq, a_scale, w2.q, w2.scale, offs, h_I2F.dtype, fast_accum=fast_accum)
