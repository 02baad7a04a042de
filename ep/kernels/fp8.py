"""FP8 (e4m3) building blocks, the DeepSeek way: activations in 1x128 tiles, weights in
128x128 blocks, one fp32 scale each, products accumulated in fp32.

The FP8 expert mode (`MoEConfig.expert_dtype`, `fp8_scaling`; `ep.experts.linear1_fp8` /
`linear2_fp8`) and FP8 dispatch (`MoEConfig.dispatch_dtype`) call them. Each has a plain
torch path (CPU, or any device) and, where it pays, a Triton kernel for CUDA
(`ep.kernels.triton_fp8`), chosen as `ep.kernels.permute.use_triton` does.

Layouts (the layer's: weights `[E, K, N]`, rows of x grouped by expert, `offs` as
`torch._grouped_mm` takes it):

    activations  x [M, K]     ->  q [M, K] e4m3,  scale [M, K/128] fp32     (1x128 tiles; K % 128 == 0)
    weights      w [E, K, N]  ->  q [E, K, N] e4m3, scale [E, ceil(K/128), ceil(N/128)] fp32  (128x128)
    rowwise (the `torch._scaled_grouped_mm` recipe):
                 x [M, K]     ->  q [M, K],  scale [M]          (one scale per row, over all of K)
                 w [E, K, N]  ->  q [E, K, N] stored K-contiguous (a transposed `[E, N, K]`),
                                  scale [E, N]                   (one scale per column of each expert)
    weight-gradient operands (`fp8_wgrad`: `dw[e] = a[rows of e]^T @ b[rows of e]`, the
    2d-2d product, which sums over the rows):
                 a [T, C]     ->  q [C, T_pad] (transposed), scale [E * C]  (one scale per
                                  column of each expert's rows), offs_pad [E]: each expert's
                                  rows start at a multiple of 16 (zeros between)

A scale is what dequantization multiplies by: `x ~= q * scale`, `scale = amax / 448` over
the tile or block (448 the largest e4m3 value), so the tile's largest magnitude maps to
448. With `pow2_scales` the scale is rounded up to a power of two (exact in the exponent
alone, as DeepSeek-V3.1's UE8M0 scales; costs up to a factor 2 of range). A tile of zeros
gets scale 1 (its q is 0, so it dequantizes to exact zeros); a tile whose amax would give
a subnormal fp32 scale gets the smallest normal one.

Blockwise to rowwise: `torch._scaled_grouped_mm` takes only one scale per row of x and
one per column of w (the 1x128 / 128x128 recipes exist for `torch._scaled_mm`, not for the
grouped product, in torch 2.11-2.13). A 128x128-scaled weight cannot be folded into
per-column scales exactly (a column's K/128 blocks have different scales), so the rowwise
path requantizes: a checkpoint's weights once, at load (`requantize_weight_columns`:
dequantize in fp32, quantize per column), and activations per call from the
high-precision rows or FP8 dispatch's tiles (`quantize_rowwise`). One scale per 7168 values loses more to outliers than one per 128
(the numbers are in the README's "Precision: FP8 expert products").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .permute import use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""The largest finite e4m3 (fn) value."""
BLOCK = 128
"""Tile width of activations (1 x BLOCK) and block side of weights (BLOCK x BLOCK)."""
AMAX_FLOOR = FP8_MAX * 2.0 ** -126
"""Smallest amax given its own scale: below it (zero excepted) the scale would be a subnormal fp32."""


@dataclass(frozen=True)
class Fp8Weight:
    """A stack of expert weights `[E, K, N]` in FP8 with its scales, of either recipe.

    q: `[E, K, N]` float8_e4m3fn. scale: `[E, ceil(K/128), ceil(N/128)]` float32, one per
    128x128 block (`w[e, k, n] ~= q[e, k, n] * scale[e, k // 128, n // 128]`), or `[E, N]`,
    one per column (the rowwise recipe: `w[e, k, n] ~= q[e, k, n] * scale[e, n]`)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def rowwise(self) -> bool:
        """Whether the scales are per column (the rowwise recipe), not per 128x128 block."""
        return self.scale.dim() == 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.rowwise:
            acc = torch.promote_types(dtype, torch.float32)
            return (self.q.to(acc) * self.scale.to(acc).unsqueeze(1)).to(dtype)
        return dequantize_weight_blocks(self.q, self.scale, dtype)


@dataclass(frozen=True)
class Fp8Experts:
    """A rank's routed experts in FP8, the layer's layout: w1 `[E_local, H, 2F]` (gate
    columns `[:F]`, up `[F:]`), w2 `[E_local, F, H]`, each with its scales (one recipe).
    None: that product runs in the layer's dtype (`MoEConfig.fp8_products`). `fast_accum`:
    the products accumulate without promotion (`MoEConfig.fp8_fast_accum`, `fp8_grouped_mm`)."""

    w1: Optional[Fp8Weight]
    w2: Optional[Fp8Weight]
    fast_accum: bool = False


def _check_fp8(q: torch.Tensor, name: str) -> None:
    if q.dtype != FP8:
        raise ValueError(f"ep.kernels.fp8: {name} must be {FP8}, got {q.dtype}")


def scale_from_amax(amax: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """fp32 scales from fp32 amaxes: `amax / 448`, 1 where amax is 0, floored at a normal
    fp32; with `pow2_scales` rounded up to a power of two (on the bits, exact)."""
    amax = amax.float()
    scale = torch.where(amax > 0, amax.clamp(min=AMAX_FLOOR) / FP8_MAX, torch.ones_like(amax))
    if pow2_scales:
        bits = scale.view(torch.int32)
        up = (bits & 0x7FFFFF) != 0  # not a power of two already: the next exponent, mantissa 0
        bits = torch.where(up, ((bits >> 23) + 1) << 23, bits)
        scale = bits.view(torch.float32)
    return scale


def _to_fp8(x_scaled: torch.Tensor) -> torch.Tensor:
    """Round to nearest e4m3 (ties to even), saturating at +-448 (e4m3fn has no infinity)."""
    return x_scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _check_rows(x: torch.Tensor, name: str) -> Tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"ep.kernels.fp8: {name} must be 2-d [rows, width], got shape {tuple(x.shape)}")
    N, H = x.shape
    if H % BLOCK:
        raise ValueError(f"ep.kernels.fp8: {name} has width {H}, not a multiple of {BLOCK} "
                         f"(1x{BLOCK} tiles need whole tiles)")
    return N, H


def quantize_rows_torch(x_NH: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in plain torch (the reference the Triton kernel is tested against)."""
    N, H = _check_rows(x_NH, "x")
    tiles = x_NH.float().reshape(N, H // BLOCK, BLOCK)
    scale = scale_from_amax(tiles.abs().amax(dim=2), pow2_scales)
    q = _to_fp8(tiles / scale.unsqueeze(2)).reshape(N, H)
    return q, scale


def quantize_rows(x_NH: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows in 1x128 tiles -> (q `[N, H]` float8_e4m3fn, scale `[N, H/128]` fp32).

    `x ~= q * scale` tile by tile (`dequantize_rows`). H must be a multiple of 128. One
    Triton kernel on CUDA; bitwise the same as the torch path (IEEE division in both)."""
    if use_triton(x_NH):
        from .triton_fp8 import quantize_rows_triton

        _check_rows(x_NH, "x")
        return quantize_rows_triton(x_NH, pow2_scales)
    return quantize_rows_torch(x_NH, pow2_scales)


def gather_quantized(q_MH: torch.Tensor, scale_MT: torch.Tensor, index_N: torch.Tensor,
                     rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantized rows and their scales gathered by `index` (`ep.kernels.gather_rows`; `rows`: a
    0-d device count of those in use) -> (q `[N, H]` float8_e4m3fn, scale `[N, H/128]` fp32).
    The bytes move as uint8 (the CPU indexes no float8 tensor)."""
    from .permute import gather_rows

    q = gather_rows(q_MH.view(torch.uint8), index_N, rows).view(q_MH.dtype)
    return q, gather_rows(scale_MT, index_N, rows)


def dequantize_rows(q_NH: torch.Tensor, scale_NT: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` per 1x128 tile -> `[N, H]` in `dtype` (products in at least fp32)."""
    _check_fp8(q_NH, "q")
    N, H = _check_rows(q_NH, "q")
    if tuple(scale_NT.shape) != (N, H // BLOCK):
        raise ValueError(f"ep.kernels.fp8: scale has shape {tuple(scale_NT.shape)}, q {tuple(q_NH.shape)} needs "
                         f"{(N, H // BLOCK)}")
    acc = torch.promote_types(dtype, torch.float32)
    tiles = q_NH.to(acc).reshape(N, H // BLOCK, BLOCK) * scale_NT.to(acc).unsqueeze(2)
    return tiles.reshape(N, H).to(dtype)


def quantize_rowwise_torch(x_MK: torch.Tensor, pow2_scales: bool = False, index: Optional[torch.Tensor] = None,
                           rows: Optional[torch.Tensor] = None,
                           x_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rowwise` in plain torch (the reference its Triton kernel is tested against)."""
    from .permute import gather_rows

    if x_scale is not None:  # FP8 rows in 1x128 tiles: dequantized in fp32, then one scale per row
        x = dequantize_rows(*gather_quantized(x_MK, x_scale, index, rows), torch.float32)
    else:
        x = (gather_rows(x_MK, index, rows) if index is not None else x_MK).float()
    scale = scale_from_amax(x.abs().amax(dim=1), pow2_scales) if x.shape[1] else x.new_ones(x.shape[0])
    return _to_fp8(x / scale.unsqueeze(1)), scale


def quantize_rowwise(x_MK: torch.Tensor, pow2_scales: bool = False, index: Optional[torch.Tensor] = None,
                     rows: Optional[torch.Tensor] = None,
                     x_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One scale per row (the rowwise recipe of `torch._scaled_grouped_mm`) -> (q `[M, K]`
    e4m3, scale `[M]` fp32). With `index` the rows are `x[index]` (`rows`: a 0-d device count
    of those in use; the others are left unwritten). With `x_scale`, x is e4m3 in 1x128 tiles
    (FP8 dispatch's rows): dequantized in fp32 and quantized again per row. One Triton kernel
    on CUDA (bitwise the torch path's), plain torch elsewhere."""
    if x_MK.dim() != 2:
        raise ValueError(f"ep.kernels.fp8: x must be 2-d, got shape {tuple(x_MK.shape)}")
    if x_scale is not None:
        _check_fp8(x_MK, "x")
        _check_rows(x_MK, "x")
    if use_triton(x_MK):
        from .triton_fp8 import quantize_rowwise_triton

        return quantize_rowwise_triton(x_MK, x_MK.shape[1], 1 if x_scale is not None else 0, x_scale, index, rows,
                                       pow2_scales=pow2_scales)
    return quantize_rowwise_torch(x_MK, pow2_scales, index, rows, x_scale)


def gather_quantize_rowwise(x_MK: torch.Tensor, index: torch.Tensor, rows: Optional[torch.Tensor] = None,
                            pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows `x[index]` both as they are and quantized with one scale each -> (rows `[M, K]`
    in x's dtype, q `[M, K]` e4m3, scale `[M]` fp32): `gather_rows` then `quantize_rowwise`
    (`rows`: a 0-d device count of the rows in use; the others are left unspecified), in one
    pass over the source rows on CUDA (one Triton kernel, bitwise the two apart). The
    backward's dz: linear2's weight gradient reads the rows, its data product the FP8."""
    from .permute import gather_rows

    if x_MK.dim() != 2:
        raise ValueError(f"ep.kernels.fp8: x must be 2-d, got shape {tuple(x_MK.shape)}")
    if use_triton(x_MK):
        from .triton_fp8 import quantize_rowwise_triton

        out = x_MK.new_empty(index.shape[0], x_MK.shape[1])
        q, scale = quantize_rowwise_triton(x_MK, x_MK.shape[1], 0, index=index, rows=rows, pow2_scales=pow2_scales,
                                           copy=out)
        return out, q, scale
    out = gather_rows(x_MK, index, rows)
    return (out, *quantize_rowwise_torch(out, pow2_scales))


def _blocked(w: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """`[E, K, N]` -> fp32 `[E, Kb, 128, Nb, 128]`, zero-padded to whole blocks."""
    E, K, N = w.shape
    Kb, Nb = -(-K // BLOCK), -(-N // BLOCK)
    w = w.float()
    if K % BLOCK or N % BLOCK:
        w = torch.nn.functional.pad(w, (0, Nb * BLOCK - N, 0, Kb * BLOCK - K))
    return w.reshape(E, Kb, BLOCK, Nb, BLOCK), Kb, Nb


def quantize_weight_blocks(w_EKN: torch.Tensor, pow2_scales: bool = False,
                           k_major: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize `[E, K, N]` weights in 128x128 blocks -> (q `[E, K, N]` e4m3, contiguous or with
    `k_major` a view of `[E, N, K]` memory (the FP8 product's B layout on sm90), scale
    `[E, ceil(K/128), ceil(N/128)]` fp32); edge blocks may be partial (a 2-d weight: `w[None]`).
    One Triton pass on CUDA (bitwise the torch path's), plain torch elsewhere."""
    if w_EKN.dim() != 3:
        raise ValueError(f"ep.kernels.fp8: w must be 3-d [E, K, N], got shape {tuple(w_EKN.shape)}")
    if use_triton(w_EKN):
        from .triton_fp8 import quantize_weight_blocks_triton

        return quantize_weight_blocks_triton(w_EKN, pow2_scales, k_major)
    E, K, N = w_EKN.shape
    blocks, Kb, Nb = _blocked(w_EKN)
    scale = scale_from_amax(blocks.abs().amax(dim=(2, 4)), pow2_scales)
    q = _to_fp8(blocks / scale[:, :, None, :, None]).reshape(E, Kb * BLOCK, Nb * BLOCK)[:, :K, :N]
    return (q.transpose(1, 2).contiguous().transpose(1, 2) if k_major else q.contiguous()), scale


def expand_blocks(scale: torch.Tensor, K: int, N: int, block_k: int = BLOCK, block_n: int = BLOCK) -> torch.Tensor:
    """Block scales `[..., Kb, Nb]` -> one per element `[..., K, N]` (edge blocks cut)."""
    return scale.repeat_interleave(block_k, dim=-2)[..., :K, :].repeat_interleave(block_n, dim=-1)[..., :N]


def dequantize_weight_blocks(q_EKN: torch.Tensor, scale: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` per 128x128 block -> `[E, K, N]` in `dtype` (products in at least fp32)."""
    _check_fp8(q_EKN, "q")
    E, K, N = q_EKN.shape
    want = (E, -(-K // BLOCK), -(-N // BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"ep.kernels.fp8: scale has shape {tuple(scale.shape)}, q {tuple(q_EKN.shape)} needs {want}")
    acc = torch.promote_types(dtype, torch.float32)
    return (q_EKN.to(acc) * expand_blocks(scale.to(acc), K, N)).to(dtype)


def quantize_weight_columns(w_EKN: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One scale per column of each expert (the rowwise recipe) -> (q `[E, K, N]` e4m3,
    K-contiguous as `torch._scaled_grouped_mm` wants it: `q.transpose(1, 2)` is contiguous;
    scale `[E, N]` fp32). One Triton kernel on CUDA (bitwise the torch path's)."""
    if w_EKN.dim() != 3:
        raise ValueError(f"ep.kernels.fp8: w must be 3-d [E, K, N], got shape {tuple(w_EKN.shape)}")
    if use_triton(w_EKN):
        from .triton_fp8 import quantize_weight_columns_triton

        return quantize_weight_columns_triton(w_EKN, pow2_scales)
    w = w_EKN.float()
    scale = scale_from_amax(w.abs().amax(dim=1), pow2_scales)
    q = _to_fp8(w / scale.unsqueeze(1))
    return q.transpose(1, 2).contiguous().transpose(1, 2), scale


def requantize_weight_columns(q_EKN: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """128x128-block FP8 weights -> the rowwise recipe (`quantize_weight_columns` of their
    fp32 dequantization): a second rounding, once, at load."""
    return quantize_weight_columns(dequantize_weight_blocks(q_EKN, scale, torch.float32))


def _host_ends(offs: torch.Tensor, counts: Optional[Sequence[int]]) -> List[int]:
    if counts is not None:
        ends, total = [], 0
        for c in counts:
            total += int(c)
            ends.append(total)
        return ends
    return [int(v) for v in offs.tolist()]


def fp8_grouped_mm_emulated(
    xq_MK: torch.Tensor, x_scale: torch.Tensor, wq_EKN: torch.Tensor, w_scale: torch.Tensor,
    offs: Optional[torch.Tensor], out_dtype: torch.dtype = torch.float32, counts: Optional[Sequence[int]] = None,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`fp8_grouped_mm` by dequantizing both operands in `acc_dtype` and multiplying there
    (fp32: the CPU path; float64: the reference). Exact promotion: every product of the
    dequantized operands equals `(qa * qb) * (sa * sb)` up to `acc_dtype` rounding. Reads
    the group ends on the host (`counts`, or `offs`)."""
    M, K = xq_MK.shape
    E, _, N = wq_EKN.shape
    if x_scale.dim() == 2:
        x = dequantize_rows(xq_MK, x_scale, acc_dtype)
        w = dequantize_weight_blocks(wq_EKN, w_scale, acc_dtype)
    else:
        x = xq_MK.to(acc_dtype) * x_scale.to(acc_dtype).unsqueeze(1)
        w = wq_EKN.to(acc_dtype) * w_scale.to(acc_dtype).unsqueeze(1)
    out = torch.zeros(M, N, dtype=acc_dtype, device=xq_MK.device)
    start = 0
    for e, end in enumerate(_host_ends(offs, counts)):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out.to(out_dtype)


def _check_grouped(xq_MK, x_scale, wq_EKN, w_scale) -> str:
    """Shapes and dtypes of `fp8_grouped_mm`'s operands; returns "blocks" or "rowwise"."""
    _check_fp8(xq_MK, "xq")
    _check_fp8(wq_EKN, "wq")
    if xq_MK.dim() != 2 or wq_EKN.dim() != 3 or xq_MK.shape[1] != wq_EKN.shape[1]:
        raise ValueError(f"ep.kernels.fp8: xq [M, K] and wq [E, K, N] do not fit: {tuple(xq_MK.shape)}, "
                         f"{tuple(wq_EKN.shape)}")
    M, K = xq_MK.shape
    E, _, N = wq_EKN.shape
    if x_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        raise ValueError(f"ep.kernels.fp8: scales must be float32, got {x_scale.dtype}, {w_scale.dtype}")
    if x_scale.dim() == 2:
        want_x, want_w = (M, K // BLOCK), (E, -(-K // BLOCK), -(-N // BLOCK))
        if K % BLOCK:
            raise ValueError(f"ep.kernels.fp8: K={K} is not a multiple of {BLOCK} (1x{BLOCK} activation tiles)")
        kind = "blocks"
    else:
        want_x, want_w = (M,), (E, N)
        kind = "rowwise"
    if tuple(x_scale.shape) != want_x or tuple(w_scale.shape) != want_w:
        raise ValueError(f"ep.kernels.fp8: {kind} scales need x_scale {want_x} and w_scale {want_w}, got "
                         f"{tuple(x_scale.shape)} and {tuple(w_scale.shape)}")
    return kind


def scaled_grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether `torch._scaled_grouped_mm` (rowwise FP8, bf16 out) runs here: CUDA devices of
    compute capability 9.0 or 10.0 (the only ones its CUDA path accepts in torch 2.11-2.13)."""
    return (x.is_cuda and hasattr(torch, "_scaled_grouped_mm") and torch.version.hip is None
            and torch.cuda.get_device_capability(x.device) in ((9, 0), (10, 0)))


def fp8_grouped_mm(
    xq_MK: torch.Tensor, x_scale: torch.Tensor, wq_EKN: torch.Tensor, w_scale: torch.Tensor,
    offs: Optional[torch.Tensor], out_dtype: torch.dtype = torch.bfloat16, counts: Optional[Sequence[int]] = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """`out[rows of e] = dequant(x)[rows of e] @ dequant(w[e])` for every expert e, in fp32
    accumulation, -> `[M, N]` in `out_dtype` (rows past the last group: unspecified).

    The scales say the recipe:
      blockwise: x_scale `[M, K/128]` (`quantize_rows`), w_scale `[E, ceil(K/128), ceil(N/128)]`
        (`quantize_weight_blocks`). CUDA: one Triton kernel (`ep.kernels.triton_fp8`: a K loop
        of 128 whose fp32 partial products are scaled by `sa[row] * sb[block]` and summed,
        DeepGEMM's promotion); elsewhere the fp32 emulation.
      rowwise: x_scale `[M]` (`quantize_rowwise`), w_scale `[E, N]` (`quantize_weight_columns`).
        CUDA sm90/sm100 with `out_dtype=bfloat16`: `torch._scaled_grouped_mm` (wq must be
        K-contiguous, K and N multiples of 16, fewer than 1024 experts); elsewhere the emulation.

    Args:
        xq_MK: `[M, K]` e4m3, rows grouped by expert in expert order, unit stride along K.
        wq_EKN: `[E, K, N]` e4m3.
        offs: `[E]` int32 cumulative rows per expert on x's device (the device paths read it
            there: no host sync), or None with `counts`.
        counts: `[E]` host ints (the emulation's group sizes; read from `offs` if None).
        fast_accum: rowwise on CUDA: `torch._scaled_grouped_mm(use_fast_accum=True)`, the
            partial sums kept in the tensor cores' accumulator over all of K rather than
            promoted to fp32 at intervals along K (faster, less accurate over long K). The
            blockwise product always promotes, and the emulation is exact fp32: both ignore it.
    """
    kind = _check_grouped(xq_MK, x_scale, wq_EKN, w_scale)
    if offs is not None and kind == "blocks" and use_triton(x_scale):
        from .triton_fp8 import fp8_grouped_mm_triton

        return fp8_grouped_mm_triton(xq_MK, x_scale, wq_EKN, w_scale, offs, out_dtype)
    E, K, N = wq_EKN.shape
    if (offs is not None and kind == "rowwise" and out_dtype == torch.bfloat16 and scaled_grouped_mm_available(xq_MK)
            and wq_EKN.stride(1) == 1 and xq_MK.stride(1) == 1 and K % 16 == 0 and N % 16 == 0 and E < 1024):
        return torch._scaled_grouped_mm(xq_MK, wq_EKN, x_scale, w_scale, offs=offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast_accum)
    return fp8_grouped_mm_emulated(xq_MK, x_scale, wq_EKN, w_scale, offs, out_dtype, counts)


WGRAD_ALIGN = 16
"""Rows each expert's group of a weight-gradient operand is padded to a multiple of:
`torch._scaled_grouped_mm`'s 2d-2d form sums over the rows (its K), and its groups along K
must start at 16-byte strides (16 e4m3 values)."""


def padded_group_offsets(offs: torch.Tensor, align: int = WGRAD_ALIGN) -> torch.Tensor:
    """Cumulative group ends with each group's rows rounded up to a multiple of `align` (on
    offs' device: no host read)."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    return torch.cumsum((counts + align - 1) // align * align, 0).to(torch.int32)


def quantize_columns_per_group_torch(x_TC: torch.Tensor, offs: torch.Tensor, counts: Optional[Sequence[int]] = None,
                                     pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_columns_per_group` in plain torch (the reference its Triton kernel is tested
    against; reads the group ends on the host: `counts`, or `offs`)."""
    T, C = x_TC.shape
    ends = _host_ends(offs, counts)
    E = len(ends)
    q = torch.zeros(C, T + (WGRAD_ALIGN - 1) * E, dtype=FP8, device=x_TC.device)
    scale = torch.ones(E, C, dtype=torch.float32, device=x_TC.device)
    start = pstart = 0
    for e, end in enumerate(ends):
        if end > start:
            rows = x_TC[start:end].float()
            scale[e] = scale_from_amax(rows.abs().amax(dim=0), pow2_scales)
            q[:, pstart:pstart + end - start] = _to_fp8(rows / scale[e]).t()
        pstart += -(-(end - start) // WGRAD_ALIGN) * WGRAD_ALIGN
        start = end
    return q, scale.reshape(-1), padded_group_offsets(offs)


def quantize_columns_per_group(x_TC: torch.Tensor, offs: torch.Tensor, counts: Optional[Sequence[int]] = None,
                               pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight-gradient operand (rows grouped by expert, `offs` as `torch._grouped_mm`'s) ->
    (q `[C, T + 15 E]` e4m3: each expert's rows quantized with one scale per column over
    those rows, written transposed from `offs_pad`'s group starts, zeros up to the next;
    past the last group unspecified), scale `[E * C]` fp32 (expert e's at `[e C, (e + 1) C)`;
    1 for an empty group), offs_pad `[E]` int32 (`padded_group_offsets`). One Triton kernel
    on CUDA: bitwise the torch path's (which reads the group ends on the host: `counts`, or
    `offs`) in Triton's interpreter, but not on an H100 (r42b: some elements differ, the
    products' errors agree to three digits; not diagnosed). Not used by the layer: FP8 weight
    gradients do not pay with torch's 2d-2d product (r42b)."""
    if x_TC.dim() != 2:
        raise ValueError(f"ep.kernels.fp8: a weight-gradient operand must be 2-d [rows, C], got {tuple(x_TC.shape)}")
    if use_triton(x_TC):
        from .triton_fp8 import quantize_columns_per_group_triton

        return quantize_columns_per_group_triton(x_TC, offs, pow2_scales)
    return quantize_columns_per_group_torch(x_TC, offs, counts, pow2_scales)


def fp8_wgrad_emulated(aq_MT: torch.Tensor, a_scale: torch.Tensor, bq_NT: torch.Tensor, b_scale: torch.Tensor,
                       offs_pad: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                       acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 2d-2d FP8 product of `quantize_columns_per_group`'s outputs, dequantized in
    `acc_dtype` and multiplied there -> `[E, M, N]` (zeros for an empty group)."""
    M, N, E = aq_MT.shape[0], bq_NT.shape[0], offs_pad.shape[0]
    out = torch.zeros(E, M, N, dtype=acc_dtype, device=aq_MT.device)
    sa, sb = a_scale.reshape(E, M).to(acc_dtype), b_scale.reshape(E, N).to(acc_dtype)
    start = 0
    for e, end in enumerate(int(v) for v in offs_pad.tolist()):
        if end > start:
            a = aq_MT[:, start:end].to(acc_dtype) * sa[e, :, None]
            b = bq_NT[:, start:end].to(acc_dtype) * sb[e, :, None]
            torch.mm(a, b.t(), out=out[e])
        start = end
    return out.to(out_dtype)


def fp8_wgrad(a_TM: torch.Tensor, b_TN: torch.Tensor, offs: torch.Tensor, counts: Optional[Sequence[int]] = None,
              fast_accum: bool = False) -> torch.Tensor:
    """`dw[e] = a[rows of e]^T @ b[rows of e]` with both operands in FP8 (one scale per column
    of each expert's rows: `quantize_columns_per_group`), accumulated in fp32 -> `[E, M, N]`
    in a's dtype. CUDA sm90/sm100 with bf16 operands: `torch._scaled_grouped_mm`'s 2d-2d form
    (`fast_accum`: its `use_fast_accum`); elsewhere the fp32 emulation. An expert with no rows
    gets zeros where `counts` says so; on CUDA without `counts` every group must have rows
    (as `ep.kernels.grouped_mm_wgrad`: the kernel does not write an empty group)."""
    if a_TM.shape[0] != b_TN.shape[0]:
        raise ValueError(f"ep.kernels.fp8: fp8_wgrad's operands need the same rows, got {tuple(a_TM.shape)} and "
                         f"{tuple(b_TN.shape)}")
    aq, sa, offs_pad = quantize_columns_per_group(a_TM, offs, counts)
    bq, sb, _ = quantize_columns_per_group(b_TN, offs, counts)
    M, N, E = a_TM.shape[1], b_TN.shape[1], offs.shape[0]
    if (a_TM.dtype == torch.bfloat16 and scaled_grouped_mm_available(a_TM) and M % 16 == 0 and N % 16 == 0
            and E < 1024):
        dw = torch._scaled_grouped_mm(aq, bq.t(), sa, sb, offs=offs_pad, out_dtype=torch.bfloat16,
                                      use_fast_accum=fast_accum)
        for e, c in enumerate(counts or ()):
            if c == 0:
                dw[e].zero_()
        return dw
    return fp8_wgrad_emulated(aq, sa, bq, sb, offs_pad, a_TM.dtype)


def _check_swiglu_input(h_N2F: torch.Tensor) -> None:
    if h_N2F.dim() != 2 or h_N2F.shape[1] % (2 * BLOCK):
        raise ValueError(f"ep.kernels.fp8: h must be [N, 2F] with F a multiple of {BLOCK}, got {tuple(h_N2F.shape)}")


def swiglu_quantize_torch(h_N2F: torch.Tensor, limit: Optional[float] = None, pow2_scales: bool = False,
                          rowwise: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`swiglu_quantize` in plain torch: SwiGLU in fp32, quantized from fp32."""
    _check_swiglu_input(h_N2F)
    gate, up = h_N2F.float().chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    a = torch.nn.functional.silu(gate) * up
    return quantize_rowwise_torch(a, pow2_scales) if rowwise else quantize_rows_torch(a, pow2_scales)


def swiglu_quantize(h_N2F: torch.Tensor, limit: Optional[float] = None, pow2_scales: bool = False,
                    rowwise: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU fused with linear2's input quantization: `silu(gate) * up` of `h = [gate | up]`
    (clamped by `limit` as `ep.kernels.swiglu`), computed in fp32 and quantized straight from
    fp32 in 1x128 tiles -> (q `[N, F]` e4m3, scale `[N, F/128]` fp32), or with `rowwise` one
    scale per row (scale `[N]`). F must be a multiple of 128. One Triton kernel on CUDA
    (reads 2F, writes F bytes and the scales per row)."""
    _check_swiglu_input(h_N2F)
    if use_triton(h_N2F):
        from .triton_fp8 import quantize_rowwise_triton, swiglu_quantize_triton

        if rowwise:
            return quantize_rowwise_triton(h_N2F, h_N2F.shape[1] // 2, 2, limit=limit, pow2_scales=pow2_scales)
        return swiglu_quantize_triton(h_N2F, limit, pow2_scales)
    return swiglu_quantize_torch(h_N2F, limit, pow2_scales, rowwise)
