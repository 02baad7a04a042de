"""The one layout of an exchanged row of the wave engine (`ep.plan`, `ep.pipeline`).

A dispatched row carries its token's hidden vector and, in the same bytes, what its owner
needs to use it: for each of the token's k slots the local expert it serves there (-1: a
slot served on another rank, or a padding row) and its routing weight, and the sender's
status words (`ep.checks`' status slots: its input checks, rows past the capacity), and
with dedup across expert waves each slot's place in the rows that return its touch. So
one all-to-all per wave moves a wave's
rows and their slot tables together, and the receiver needs no count exchange: a row whose
k expert ids are all -1 is padding. The backward's returning rows use the same layout with
the weight columns holding the routing weights' gradients.

Bytes of one row, in order (each part aligned to its element size; the row holds a whole
number of 16-element groups, so every part can be viewed in place and row starts stay
16-byte aligned):

    [ data: H x dtype | weights: k x acc dtype | ids: k x int32 | back: k x int32 | status: S x int32 | pad ]

With FP8 dispatch (`data_dtype`, `MoEConfig.dispatch_dtype`) the data part is the token
quantized in 1x128 tiles, then its scales:

    [ data: H x float8_e4m3fn | scales: H/128 x fp32 | weights | ids | back | status | pad ]

`acc` is the accumulation dtype (at least fp32: float64 under float64), so float64 weights
travel exactly. The row is stored as `dtype` elements (`RowLayout.width` of them), so the
transports move it as any other tensor of rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from .checks import STATUS_SLOTS
from .dtypes import accumulate_dtype
from .kernels.fp8 import BLOCK as SCALE_TILE  # elements per fp32 scale of a quantized row


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class RowLayout:
    """Where each part of an exchanged row lies (see the module docstring).

    Args:
        hidden: H.
        top_k: k.
        dtype: the rows' dtype (the layer's).
        data_dtype: the hidden vectors' dtype: None (dtype) or float8_e4m3fn (with scales).
    """

    hidden: int
    top_k: int
    dtype: torch.dtype
    data_dtype: Optional[torch.dtype] = None

    @property
    def quantized(self) -> bool:
        """Whether the data part is FP8 with 1x128 scales."""
        return self.data_dtype is not None and self.data_dtype != self.dtype

    def plain(self) -> "RowLayout":
        """This layout with the data in `dtype` (the rows that return: sums, gradients)."""
        return RowLayout(self.hidden, self.top_k, self.dtype)

    @property
    def acc_dtype(self) -> torch.dtype:
        return accumulate_dtype(self.dtype)

    @cached_property
    def _sizes(self):
        es = torch.empty(0, dtype=self.dtype).element_size()
        acc_es = torch.empty(0, dtype=self.acc_dtype).element_size()
        data_bytes = self.hidden * es
        if self.quantized:  # one byte per element, then the tiles' fp32 scales
            data_bytes = self.hidden + 4 * (self.hidden // SCALE_TILE)
        weights_at = _round_up(data_bytes, acc_es)
        ids_at = weights_at + self.top_k * acc_es
        back_at = ids_at + 4 * self.top_k
        status_at = back_at + 4 * self.top_k
        # a whole number of 16-element groups: strided row kernels can then use 16-byte accesses
        row_bytes = _round_up(status_at + 4 * STATUS_SLOTS, max(16 * es, acc_es))
        return es, weights_at, ids_at, status_at, row_bytes

    @property
    def width(self) -> int:
        """Elements of `dtype` per row."""
        es, *_, row_bytes = self._sizes
        return row_bytes // es

    def empty(self, rows: int, device) -> torch.Tensor:
        """`[rows, width]` uninitialised rows."""
        return torch.empty(rows, self.width, dtype=self.dtype, device=device)

    def _part(self, rows: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if rows.dim() != 2 or rows.shape[1] != self.width or rows.dtype != self.dtype or rows.stride(1) != 1:
            raise ValueError(f"expected rows [N, {self.width}] of {self.dtype} with unit column stride, "
                             f"got {tuple(rows.shape)} {rows.dtype}")
        return rows.view(torch.uint8)[:, start:stop].view(dtype)

    def data(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N, H]` view of the rows' hidden vectors (in `data_dtype` when quantized)."""
        if self.quantized:
            return self._part(rows, 0, self.hidden, self.data_dtype)
        return rows[:, :self.hidden]

    def scales(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N, H/128]` fp32 view: the quantized data's tile scales (quantized layouts only)."""
        assert self.quantized, "RowLayout.scales: the data part is not quantized"
        return self._part(rows, self.hidden, self.hidden + 4 * (self.hidden // SCALE_TILE), torch.float32)

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N, k]` view (acc dtype): routing weights (gradients, on the way back)."""
        _, weights_at, ids_at, _, _ = self._sizes
        return self._part(rows, weights_at, ids_at, self.acc_dtype)

    def ids(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N, k]` int32 view: the local expert of each slot at the receiver, -1 for none."""
        _, _, ids_at, status_at, _ = self._sizes
        return self._part(rows, ids_at, ids_at + 4 * self.top_k, torch.int32)

    def back(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N, k]` int32 view: with dedup across expert waves, each slot's row within the
        region that returns its touch (-1: none); unwritten otherwise."""
        _, _, ids_at, status_at, _ = self._sizes
        return self._part(rows, ids_at + 4 * self.top_k, status_at, torch.int32)

    def status(self, rows: torch.Tensor) -> torch.Tensor:
        """`[N, STATUS_SLOTS]` int32 view: the sender's status (`ep.checks`' slots)."""
        _, _, _, status_at, _ = self._sizes
        return self._part(rows, status_at, status_at + 4 * STATUS_SLOTS, torch.int32)
