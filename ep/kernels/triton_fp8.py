"""Triton kernels of the FP8 building blocks (CUDA): 1x128 quantization, SwiGLU fused with
it, and the blockwise-scaled grouped product. `ep.kernels.fp8` holds the layouts, the torch
paths these are tested against (`tests/test_fp8.py`, in Triton's interpreter), and the
dispatch.

Quantization (`_quantize_rows_kernel`, `_swiglu_quantize_kernel`): program (row, j) takes
TILES tiles of 128 columns of one row as a `[TILES, 128]` block: amax per tile, the scale
(`scale_from_amax`'s rule, the power-of-two rounding on the bits), `q = x / scale` with
IEEE division (`div_rn`: the same bits as the torch path), saturated to +-448, rounded to
e4m3 on the bits (`_round_e4m3`), then converted (exactly). SwiGLU is computed in fp32
from h and quantized from fp32 (no bf16 rounding between).

Rowwise quantization (`_rowwise_kernel`: one program per row, gathered by an index, from
plain rows, FP8 dispatch's tiled rows, or SwiGLU's input) and per-column weight scales
(`_quantize_columns_kernel`: one program per expert and 64 columns): two passes over the
row or the columns, the amax first, then the values, as their torch paths compute them.

Grouped product (`_fp8_grouped_kernel`), DeepGEMM's scheme in plain Triton: program
(t, j) computes tile t of BLOCK_M rows of one expert's group (each group is cut into
ceil(rows / BLOCK_M) tiles, found from `offs` on the device: no host sync) times columns
`[j BLOCK_N, (j + 1) BLOCK_N)` (BLOCK_N divides 128: one weight block column). Along K,
steps of 128: the e4m3 x e4m3 product of the step (tensor cores; on sm90 Triton lets them
accumulate the 128 terms at their own reduced precision) is promoted to fp32 and added
times `sa[row, step] * sb[e, step, j]`. Not tuned, not persistent, no TMA: ~450 TFLOP/s at
dsv3 on an H100 (r37b, r38a), against bf16's ~750 and the rowwise `torch._scaled_grouped_mm`'s
~1,050.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .fp8 import AMAX_FLOOR, BLOCK, FP8, FP8_MAX, WGRAD_ALIGN, padded_group_offsets

_MAX = tl.constexpr(FP8_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)
_TILE = tl.constexpr(BLOCK)

GROUPED_CONFIG: Tuple[int, int, int, int] = (64, 128, 4, 3)
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) of the grouped product; BLOCK_N must divide 128."""
QUANT_TILES = 8
"""Tiles of 128 columns per quantization program."""


@triton.jit
def _scale_of(amax, POW2: tl.constexpr):
    """fp32 scales from fp32 amaxes, as `ep.kernels.fp8.scale_from_amax`."""
    scale = tl.where(amax > 0, tl.math.div_rn(tl.maximum(amax, _FLOOR), _MAX), 1.0)
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFF) != 0, ((bits >> 23) + 1) << 23, bits)
        scale = bits.to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _round_e4m3(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), still fp32, sign kept.

    Done on the bits so that the conversion after it is exact: Triton's interpreter rounds
    wrongly where rounding carries into the exponent (124.3 -> 64, not 128), and this keeps
    the kernel's bits those of the torch path wherever it runs."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # normal e4m3 (>= 2^-6): keep 3 mantissa bits, round half to even (a carry moves the exponent)
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -0x100000
    # subnormal e4m3: multiples of 2^-9, rounded by fp32 addition at that spacing
    a = mag.to(tl.float32, bitcast=True)
    sub = ((a + 16384.0) - 16384.0).to(tl.int32, bitcast=True)
    r = tl.where(a >= 0.015625, normal, sub) | (bits & -0x80000000)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3(v, scale):
    """fp32 values over their (broadcast) scales -> e4m3: IEEE division (`div_rn`, the torch
    path's bits), saturated to +-448, rounded to nearest even (`_round_e4m3`), then converted
    exactly. Every quantizer's last step."""
    return _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -_MAX), _MAX)).to(tl.float8e4nv)


@triton.jit
def _store_quantized(v, q, s, row, t, live, cols, q_stride, s_stride, POW2: tl.constexpr):
    """v `[TILES, 128]` fp32 -> e4m3 into q's row, the tiles' scales into s's row."""
    scale = _scale_of(tl.max(tl.abs(v), axis=1), POW2)
    tl.store(q + row * q_stride + cols, _to_e4m3(v, scale[:, None]), mask=live[:, None])
    tl.store(s + row * s_stride + t, scale, mask=live)


@triton.jit
def _quantize_rows_kernel(x, q, s, T, x_stride, q_stride, s_stride, TILES: tl.constexpr, POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * TILES + tl.arange(0, TILES)
    live = t < T
    cols = t[:, None] * _TILE + tl.arange(0, _TILE)[None, :]
    v = tl.load(x + row * x_stride + cols, mask=live[:, None], other=0.0).to(tl.float32)
    _store_quantized(v, q, s, row, t, live, cols, q_stride, s_stride, POW2)


@triton.jit
def _swiglu_quantize_kernel(h, q, s, F, T, limit, h_stride, q_stride, s_stride, TILES: tl.constexpr,
                            HAS_LIMIT: tl.constexpr, POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * TILES + tl.arange(0, TILES)
    live = t < T
    cols = t[:, None] * _TILE + tl.arange(0, _TILE)[None, :]
    gate = tl.load(h + row * h_stride + cols, mask=live[:, None], other=0.0).to(tl.float32)
    up = tl.load(h + row * h_stride + F + cols, mask=live[:, None], other=0.0).to(tl.float32)
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    _store_quantized(gate * tl.sigmoid(gate) * up, q, s, row, t, live, cols, q_stride, s_stride, POW2)


@triton.jit
def _row_values(x, xs, src, ks, live, x_stride, xs_stride, F, limit, MODE: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """fp32 values at columns `ks` of source row `src`: MODE 0 the row itself, 1 an e4m3 row
    times its 1x128 tile scales `xs`, 2 SwiGLU of an `[gate | up]` row (clamped by `limit`)."""
    base = x + src * x_stride
    if MODE == 2:
        gate = tl.load(base + ks, mask=live, other=0.0).to(tl.float32)
        up = tl.load(base + F + ks, mask=live, other=0.0).to(tl.float32)
        if HAS_LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        return gate * tl.sigmoid(gate) * up
    v = tl.load(base + ks, mask=live, other=0.0).to(tl.float32)
    if MODE == 1:
        v = v * tl.load(xs + src * xs_stride + ks // _TILE, mask=live, other=0.0)
    return v


@triton.jit
def _rowwise_kernel(x, xs, index, count, q, s, copy, x_stride, xs_stride, q_stride, copy_stride, limit, K: tl.constexpr,
                    MODE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_COUNT: tl.constexpr, HAS_LIMIT: tl.constexpr,
                    POW2: tl.constexpr, HAS_COPY: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program i: output row i (from source row `index[i]`, or i) quantized with one scale
    over its K values: a pass for the amax, a second to quantize (the values made again;
    `HAS_COPY`, MODE 0: the second pass also stores the row as it is into `copy`'s row i)."""
    i = tl.program_id(0)
    if HAS_COUNT:
        if i >= tl.load(count):
            return
    src = tl.load(index + i).to(tl.int64) if HAS_INDEX else i.to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = _row_values(x, xs, src, ks, ks < K, x_stride, xs_stride, K, limit, MODE, HAS_LIMIT)
        amax = tl.maximum(amax, tl.abs(v))
    scale = _scale_of(tl.max(amax, axis=0), POW2)
    row = i.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        live = ks < K
        v = _row_values(x, xs, src, ks, live, x_stride, xs_stride, K, limit, MODE, HAS_LIMIT)
        qv = _to_e4m3(v, scale)
        tl.store(q + row * q_stride + ks, qv, mask=live)
        if HAS_COPY:
            tl.store(copy + row * copy_stride + ks, v.to(copy.dtype.element_ty), mask=live)
    tl.store(s + row, scale)


@triton.jit
def _quantize_columns_kernel(w, q, s, N, w_se, w_sk, w_sn, q_se, q_sk, q_sn, s_se, K: tl.constexpr,
                             POW2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (e, j): columns `[j BLOCK_N, (j + 1) BLOCK_N)` of expert e, one scale each over
    all of K (a pass for the amaxes, a second to quantize), e4m3 stored through q's strides."""
    e = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live_n = ns < N
    amax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, _TILE):
        ks = k0 + tl.arange(0, _TILE)
        live = (ks[:, None] < K) & live_n[None, :]
        v = tl.load(w + e * w_se + ks[:, None] * w_sk + ns[None, :] * w_sn, mask=live, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
    scale = _scale_of(amax, POW2)
    for k0 in range(0, K, _TILE):
        ks = k0 + tl.arange(0, _TILE)
        live = (ks[:, None] < K) & live_n[None, :]
        v = tl.load(w + e * w_se + ks[:, None] * w_sk + ns[None, :] * w_sn, mask=live, other=0.0).to(tl.float32)
        qv = _to_e4m3(v, scale[None, :])
        tl.store(q + e * q_se + ks[:, None] * q_sk + ns[None, :] * q_sn, qv, mask=live)
    tl.store(s + e * s_se + ns, scale, mask=live_n)


@triton.jit
def _columns_per_group_kernel(x, offs, q, s, C, E, x_stride, q_stride, EP: tl.constexpr, ALIGN: tl.constexpr,
                              POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (e, j): columns `[j BLOCK_C, (j + 1) BLOCK_C)` of expert e's rows, one scale each
    over those rows (a pass for the amaxes, a second to quantize), e4m3 stored transposed from
    the group's padded start (found from `offs` on the device), zeros up to the next."""
    e = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cs < C
    es = tl.arange(0, EP)
    ends = tl.load(offs + es, mask=es < E, other=0)
    starts = tl.load(offs + es - 1, mask=(es > 0) & (es < E), other=0)
    padded = tl.where(es < E, (ends - starts + ALIGN - 1) // ALIGN * ALIGN, 0)
    pstart = tl.sum(tl.where(es < e, padded, 0), axis=0).to(tl.int64)
    start = tl.sum(tl.where(es == e, starts, 0), axis=0)
    end = tl.sum(tl.where(es == e, ends, 0), axis=0)
    pcount = tl.sum(tl.where(es == e, padded, 0), axis=0)
    amax = tl.zeros([BLOCK_C], dtype=tl.float32)
    t0 = start
    while t0 < end:  # (while, not range: the interpreter cannot take a loaded bound as a range's)
        ts = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        live = (ts < end)[:, None] & live_c[None, :]
        v = tl.load(x + ts[:, None] * x_stride + cs[None, :], mask=live, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
        t0 += BLOCK_T
    scale = _scale_of(amax, POW2)
    t0 = start * 0  # (a tensor like the bounds, for the loop's type)
    while t0 < pcount:
        ts = t0 + tl.arange(0, BLOCK_T)
        src = (start + ts).to(tl.int64)
        v = tl.load(x + src[:, None] * x_stride + cs[None, :], mask=(src < end)[:, None] & live_c[None, :],
                    other=0.0).to(tl.float32)
        qv = _to_e4m3(v, scale[None, :])
        tl.store(q + cs[None, :].to(tl.int64) * q_stride + pstart + ts[:, None], qv,
                 mask=(ts < pcount)[:, None] & live_c[None, :])
        t0 += BLOCK_T
    tl.store(s + e.to(tl.int64) * C + cs, scale, mask=live_c)


@triton.jit
def _fp8_grouped_kernel(x, xs, w, ws, offs, out, N, E, x_stride, xs_stride, w_se, w_sk, w_sn, ws_se, ws_sk, ws_sn,
                        out_stride, K: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # which expert's group, and which tile of it, this program computes (from offs alone)
    es = tl.arange(0, EP)
    ends = tl.load(offs + es, mask=es < E, other=0)
    starts = tl.load(offs + es - 1, mask=(es > 0) & (es < E), other=0)
    tiles = tl.where(es < E, tl.cdiv(ends - starts, BLOCK_M), 0)
    first = tl.cumsum(tiles, axis=0) - tiles
    mine = (first <= pid_m) & (pid_m < first + tiles)
    if tl.sum(mine.to(tl.int32), axis=0) == 0:  # past the last group's last tile
        return
    e = tl.sum(tl.where(mine, es, 0), axis=0).to(tl.int64)
    m0 = tl.sum(tl.where(mine, starts + (pid_m - first) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    rows = m0 + tl.arange(0, BLOCK_M)
    live = rows < end
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    live_c = cols < N
    nb = (pid_n * BLOCK_N) // _TILE
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, K // _TILE):
        ks = kb * _TILE + tl.arange(0, _TILE)
        a = tl.load(x + rows[:, None] * x_stride + ks[None, :], mask=live[:, None], other=0.0)
        b = tl.load(w + e * w_se + ks[:, None] * w_sk + cols[None, :] * w_sn, mask=live_c[None, :], other=0.0)
        sa = tl.load(xs + rows * xs_stride + kb, mask=live, other=0.0)
        sb = tl.load(ws + e * ws_se + kb * ws_sk + nb * ws_sn)
        acc += tl.dot(a, b) * (sa[:, None] * sb)
    tl.store(out + rows[:, None] * out_stride + cols[None, :], acc.to(out.dtype.element_ty),
             mask=live[:, None] & live_c[None, :])


@triton.jit
def _quantize_blocks_kernel(w, q, s, K, N, w_se, w_sk, w_sn, q_se, q_sk, q_sn, s_se, s_sk, s_sn,
                            POW2: tl.constexpr):
    """Program (e, kb, nb): the 128x128 block of w at (kb, nb), its amax scale, and its e4m3
    values stored through q's strides (any layout: K-major for the FP8 product's B)."""
    e = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    nb = tl.program_id(2)
    ks = kb * _TILE + tl.arange(0, _TILE)
    ns = nb * _TILE + tl.arange(0, _TILE)
    live = (ks[:, None] < K) & (ns[None, :] < N)
    v = tl.load(w + e * w_se + ks[:, None] * w_sk + ns[None, :] * w_sn, mask=live, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.max(tl.abs(v), axis=1), axis=0), POW2)
    qv = _to_e4m3(v, scale)
    tl.store(q + e * q_se + ks[:, None] * q_sk + ns[None, :] * q_sn, qv, mask=live)
    tl.store(s + e * s_se + kb * s_sk + nb * s_sn, scale)


def quantize_weight_blocks_triton(w_EKN: torch.Tensor, pow2_scales: bool = False,
                                  k_major: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ep.kernels.fp8.quantize_weight_blocks` in one pass (read each block once, write its
    e4m3 bytes and scale) -> (q `[E, K, N]`, scale `[E, ceil(K/128), ceil(N/128)]`); with
    `k_major` q is a view of `[E, N, K]` memory (the FP8 product's B layout), else contiguous."""
    E, K, N = w_EKN.shape
    Kb, Nb = triton.cdiv(K, BLOCK), triton.cdiv(N, BLOCK)
    q = torch.empty(E, N, K, dtype=FP8, device=w_EKN.device).transpose(1, 2) if k_major else \
        torch.empty(E, K, N, dtype=FP8, device=w_EKN.device)
    s = torch.empty(E, Kb, Nb, dtype=torch.float32, device=w_EKN.device)
    if E and K and N:
        _quantize_blocks_kernel[(E, Kb, Nb)](w_EKN, q, s, K, N, *w_EKN.stride(), *q.stride(), *s.stride(),
                                             POW2=pow2_scales, num_warps=8)
    return q, s


def quantize_rows_triton(x_NH: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """x `[N, H]` with unit stride along H, H % 128 == 0 -> (q, scale), as `quantize_rows`."""
    N, H = x_NH.shape
    T = H // BLOCK
    if x_NH.stride(1) != 1:
        x_NH = x_NH.contiguous()
    q = torch.empty(N, H, dtype=FP8, device=x_NH.device)
    s = torch.empty(N, T, dtype=torch.float32, device=x_NH.device)
    if N and T:
        tiles = min(QUANT_TILES, triton.next_power_of_2(T))
        _quantize_rows_kernel[(N, triton.cdiv(T, tiles))](x_NH, q, s, T, x_NH.stride(0), q.stride(0), s.stride(0),
                                                         TILES=tiles, POW2=pow2_scales, num_warps=4)
    return q, s


def swiglu_quantize_triton(h_N2F: torch.Tensor, limit: Optional[float] = None,
                           pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """h `[N, 2F]`, F % 128 == 0 -> (q `[N, F]`, scale `[N, F/128]`), as `swiglu_quantize`."""
    N, F2 = h_N2F.shape
    F = F2 // 2
    T = F // BLOCK
    if h_N2F.stride(1) != 1:
        h_N2F = h_N2F.contiguous()
    q = torch.empty(N, F, dtype=FP8, device=h_N2F.device)
    s = torch.empty(N, T, dtype=torch.float32, device=h_N2F.device)
    if N and T:
        tiles = min(QUANT_TILES, triton.next_power_of_2(T))
        _swiglu_quantize_kernel[(N, triton.cdiv(T, tiles))](h_N2F, q, s, F, T, float(limit or 0.0), h_N2F.stride(0),
                                                           q.stride(0), s.stride(0), TILES=tiles,
                                                           HAS_LIMIT=limit is not None, POW2=pow2_scales, num_warps=4)
    return q, s


def fp8_grouped_mm_triton(xq_MK: torch.Tensor, x_scale: torch.Tensor, wq_EKN: torch.Tensor, w_scale: torch.Tensor,
                          offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                          config: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """The blockwise `fp8_grouped_mm` (shapes checked there) -> `[M, N]` in `out_dtype`
    (rows past `offs[-1]`: unspecified). x needs unit stride along K; w any strides."""
    M, K = xq_MK.shape
    E, _, N = wq_EKN.shape
    bm, bn, warps, stages = config or GROUPED_CONFIG
    if BLOCK % bn:
        raise ValueError(f"fp8_grouped_mm_triton: BLOCK_N={bn} must divide {BLOCK}")
    if xq_MK.stride(1) != 1:
        xq_MK = xq_MK.contiguous()
    x_scale = x_scale.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=xq_MK.device)
    if M == 0 or N == 0 or E == 0:
        return out
    grid = (triton.cdiv(M, bm) + E, triton.cdiv(N, bn))
    _fp8_grouped_kernel[grid](
        xq_MK, x_scale, wq_EKN, w_scale, offs, out, N, E, xq_MK.stride(0), x_scale.stride(0), wq_EKN.stride(0),
        wq_EKN.stride(1), wq_EKN.stride(2), w_scale.stride(0), w_scale.stride(1), w_scale.stride(2), out.stride(0),
        K=K, EP=max(16, triton.next_power_of_2(E)), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return out


ROWWISE_BLOCK = 1024
"""Columns per step of the rowwise quantizer (`_rowwise_kernel`)."""


def quantize_rowwise_triton(x: torch.Tensor, K: int, mode: int, x_scale: Optional[torch.Tensor] = None,
                            index: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
                            limit: Optional[float] = None, pow2_scales: bool = False,
                            copy: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows quantized with one scale each (shapes checked by `ep.kernels.fp8.quantize_rowwise`
    / `swiglu_quantize`) -> (q `[M, K]` e4m3, scale `[M]` fp32), M = `len(index)` or x's rows.
    mode 0: x `[*, K]`; 1: x e4m3 `[*, K]` with tile scales `x_scale`; 2: x `[*, 2K]` = [gate | up],
    SwiGLU first. `rows` (0-d device count): only the first `rows` outputs are written.
    `copy` (mode 0): `[M, K]` in x's dtype, also given the rows as read (`x[index]`)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M = index.shape[0] if index is not None else x.shape[0]
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M and K:
        xs = x_scale.contiguous() if x_scale is not None else s
        _rowwise_kernel[(M,)](x, xs, index if index is not None else s, rows if rows is not None else s, q, s,
                              copy if copy is not None else x, x.stride(0), xs.stride(0), q.stride(0),
                              copy.stride(0) if copy is not None else 0, float(limit or 0.0), K=K, MODE=mode,
                              HAS_INDEX=index is not None, HAS_COUNT=rows is not None, HAS_LIMIT=limit is not None,
                              POW2=pow2_scales, HAS_COPY=copy is not None,
                              BLOCK_K=min(ROWWISE_BLOCK, triton.next_power_of_2(K)), num_warps=4)
    return q, s


def quantize_weight_columns_triton(w_EKN: torch.Tensor, pow2_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`ep.kernels.fp8.quantize_weight_columns` in Triton -> (q `[E, K, N]` a view of `[E, N, K]`
    memory, scale `[E, N]`)."""
    E, K, N = w_EKN.shape
    q = torch.empty(E, N, K, dtype=FP8, device=w_EKN.device).transpose(1, 2)
    s = torch.empty(E, N, dtype=torch.float32, device=w_EKN.device)
    if E and K and N:
        bn = 64
        _quantize_columns_kernel[(E, triton.cdiv(N, bn))](w_EKN, q, s, N, *w_EKN.stride(), *q.stride(), s.stride(0),
                                                          K=K, POW2=pow2_scales, BLOCK_N=bn, num_warps=4)
    return q, s


def quantize_columns_per_group_triton(x_TC: torch.Tensor, offs: torch.Tensor, pow2_scales: bool = False
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ep.kernels.fp8.quantize_columns_per_group` in Triton (no host read of `offs`)."""
    if x_TC.stride(1) != 1:
        x_TC = x_TC.contiguous()
    T, C = x_TC.shape
    E = offs.shape[0]
    q = torch.empty(C, T + (WGRAD_ALIGN - 1) * E, dtype=FP8, device=x_TC.device)
    s = torch.empty(E * C, dtype=torch.float32, device=x_TC.device)
    if E and C:
        bc = 64
        _columns_per_group_kernel[(E, triton.cdiv(C, bc))](
            x_TC, offs, q, s, C, E, x_TC.stride(0), q.stride(0), EP=max(16, triton.next_power_of_2(E)),
            ALIGN=WGRAD_ALIGN, POW2=pow2_scales, BLOCK_T=64, BLOCK_C=bc, num_warps=4)
    return q, s, padded_group_offsets(offs)
