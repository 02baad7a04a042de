"""`CopyEngineTransport`: all-to-all by the GPUs' copy engines through torch symmetric memory.

Every rank owns one symmetric buffer, two halves of a slot per source rank. To send, a
rank copies its rows for peer p straight into slot `me` of p's buffer (`cudaMemcpyAsync`
over NVLink: the copy engines move the bytes, no SM is used); one device-side barrier
says every copy has landed; then each rank copies its slots out into `out`. Calls
alternate halves, so a slot written now was read out two calls ago, before the last
call's barrier: one barrier per call is enough. It all runs on the transport's own stream
(one more per peer for the copies beyond two ranks), ordered after the caller's current
stream; `Pending.wait()` makes the caller's stream wait for it.

Why: NCCL's all-to-all runs as kernels that need SMs, and a grouped GEMM holds all of them
(`../shared/MEASURED.md`: the all-to-all keeps ~14% of its speed beside a GEMM); the copy
engines are separate hardware. The barrier is a small kernel: give it an SM with
`MoEConfig.sm_carveout` (a few SMs) when GEMMs run beside them.

Intranode only (all ranks on one host, CUDA peer access). Slots hold `rows_per_peer` rows
(`reserve`, which the plan calls with the largest token count of any rank, the same on
every rank); a call's row width decides the bytes, so every rank grows the buffer at the
same call. Small blocking exchanges and broadcasts go through NCCL.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .base import CommunicationError, EventPending, Pending, Transport, copy_pending
from .torch_dist import TorchDistTransport


class CopyEngineTransport(Transport):
    """All-to-all through symmetric memory and the copy engines (one host, CUDA)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout_s: Optional[float] = None) -> None:
        self._nccl = TorchDistTransport(group, timeout_s)  # its exchanges between the hosts are bounded by it
        if self._nccl.backend != "nccl":
            raise ValueError(f"CopyEngineTransport needs CUDA ranks (an NCCL group), got backend {self._nccl.backend!r}")
        import torch.distributed._symmetric_memory as symm_mem

        self._symm = symm_mem
        self.group = self._nccl.group
        self.rank, self.world_size, self.device = self._nccl.rank, self._nccl.world_size, self._nccl.device
        self._group_name = self.group.group_name
        self._rows = 0  # rows per peer the slots must hold (reserve)
        self._cap = 0  # bytes per slot
        self._buf: Optional[torch.Tensor] = None
        self._hdl = None
        self._views: Dict[Tuple[int, torch.dtype], torch.Tensor] = {}
        self._parity = 0  # which half of the buffers this call writes
        self._stream = torch.cuda.Stream(self.device)
        self._peer_streams = [torch.cuda.Stream(self.device) for _ in range(self.world_size)]

    # -- the buffer ------------------------------------------------------------------
    def reserve(self, rows_per_peer: int) -> None:
        self._rows = max(self._rows, int(rows_per_peer))

    def _grow(self, nbytes: int) -> None:
        """Collective: every rank reaches it at the same call (same rows and row width)."""
        cap = 256
        while cap < nbytes:
            cap *= 2
        torch.cuda.synchronize(self.device)  # nothing may still copy into or out of the old buffer
        self._views.clear()
        self._buf = self._hdl = None
        try:
            buf = self._symm.empty(2 * self.world_size * cap, dtype=torch.uint8, device=self.device)
            self._hdl = self._symm.rendezvous(buf, self._group_name)
        except Exception as e:  # noqa: BLE001 - say what failed and what to use instead
            raise CommunicationError(
                f"ep: rank {self.rank}: symmetric memory for the copy-engine transport failed ({type(e).__name__}: "
                f"{e}); it needs all ranks on one host with peer access; use MoEConfig(transport='nccl')"
            ) from e
        self._buf, self._cap, self._parity = buf, cap, 0

    def _view(self, peer: int, dtype: torch.dtype) -> torch.Tensor:
        key = (peer, dtype)
        if key not in self._views:
            es = torch.empty(0, dtype=dtype).element_size()
            self._views[key] = self._hdl.get_buffer(peer, (2 * self.world_size * self._cap // es,), dtype, 0)
        return self._views[key]

    # -- the all-to-all ----------------------------------------------------------------
    def all_to_all(self, out, inp, out_splits: Sequence[int], in_splits: Sequence[int], label: str = "all-to-all",
                   rows_bound: Optional[int] = None,
                   sent_rows: Optional[torch.Tensor] = None) -> Pending:
        """Copies into the peers' slots of this call's half of their buffers, one barrier,
        then copies out of this rank's slots. The halves alternate between calls, so the
        half a call writes was last read two calls ago, before the previous call's
        barrier: no barrier is needed before the copies."""
        n, me = self.world_size, self.rank
        if n == 1:
            return copy_pending(out, inp)
        inp = inp.contiguous()
        row_el = math.prod(inp.shape[1:])
        es = inp.element_size()
        most = max(max(in_splits), max(out_splits))
        if most > self._rows:
            raise CommunicationError(
                f"ep: rank {me}: {label} sends or receives {most} rows for one peer, more than the {self._rows} "
                "reserved (an internal error: the plan reserves the largest token count of any rank)"
            )
        if self._hdl is None or self._rows * row_el * es > self._cap:  # same call on every rank
            self._grow(max(self._rows * row_el * es, 1))
        half = self._parity * n * (self._cap // es)  # elements
        self._parity ^= 1
        slot_el = self._cap // es
        in_off = list(itertools.accumulate(in_splits, initial=0))
        out_off = list(itertools.accumulate(out_splits, initial=0))
        flat_in, flat_out = inp.view(-1), out.view(-1)
        cur, s = torch.cuda.current_stream(), self._stream
        s.wait_stream(cur)  # inp is ready, out is free
        streams = [s]
        try:
            with torch.cuda.stream(s):
                for j in range(1, n):
                    p = (me + j) % n
                    cnt = in_splits[p] * row_el
                    if not cnt:
                        continue
                    ps = s if n == 2 else self._peer_streams[p]  # one peer: no need for a second stream
                    if ps is not s:
                        ps.wait_stream(s)
                        streams.append(ps)
                    with torch.cuda.stream(ps):
                        at = half + me * slot_el
                        self._view(p, inp.dtype)[at: at + cnt].copy_(
                            flat_in[in_off[p] * row_el: in_off[p] * row_el + cnt], non_blocking=True)
                if out_splits[me]:
                    flat_out[out_off[me] * row_el: out_off[me + 1] * row_el].copy_(
                        flat_in[in_off[me] * row_el: in_off[me + 1] * row_el], non_blocking=True)
                for ps in streams[1:]:
                    s.wait_stream(ps)
                self._hdl.barrier(channel=0)  # every rank's copies into every slot have landed
                mine = self._view(me, inp.dtype)
                for src in range(n):
                    cnt = out_splits[src] * row_el
                    if src != me and cnt:
                        at = half + src * slot_el
                        flat_out[out_off[src] * row_el: out_off[src] * row_el + cnt].copy_(
                            mine[at: at + cnt], non_blocking=True)
                done = torch.cuda.Event()
                done.record(s)
        except Exception as e:  # noqa: BLE001
            raise CommunicationError(f"ep: rank {me} failed starting {label}: {type(e).__name__}: {e}") from e
        # the caller may free inp/out while the copies run: tell the allocator who uses them
        for t in (inp, out):
            for st in streams:
                t.record_stream(st)
        return EventPending(done)

    def exchange(self, inp: torch.Tensor, label: str = "exchange") -> torch.Tensor:
        return self._nccl.exchange(inp, label)

    def host_exchange(self, values, label: str = "host exchange"):
        return self._nccl.host_exchange(values, label)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0, label: str = "broadcast") -> None:
        self._nccl.broadcast_(tensor, src, label)

