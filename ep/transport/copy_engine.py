"""`CopyEngineTransport`: all-to-all by the GPUs' copy engines through torch symmetric memory.

Every rank owns one symmetric buffer with a slot per source rank. To send, a rank copies
its rows for peer p straight into slot `me` of p's buffer (`cudaMemcpyAsync` over NVLink:
the copy engines move the bytes, no SM is used), between two device-side barriers: the
first says every slot is free again (its owner has copied the last call's rows out), the
second that every copy has landed; then each rank copies its slots out into `out`. It all
runs on the transport's own stream (one more per peer for the copies), ordered after the
caller's current stream; `Pending.wait()` makes the caller's stream wait for it.

Why: NCCL's all-to-all runs as kernels that need SMs, and a grouped GEMM holds all of them
(`../shared/MEASURED.md`: the all-to-all keeps ~14% of its speed beside a GEMM); the copy
engines are separate hardware. The barriers are small kernels: give them an SM with
`MoEConfig.sm_carveout` (a few SMs) when GEMMs run beside them.

Intranode only (all ranks on one host, CUDA peer access). Slots hold `rows_per_peer` rows
(`reserve`, which the plan calls with the largest token count of any rank, the same on
every rank); a call's row width decides the bytes, so every rank grows the buffer at the
same call. Small blocking exchanges and broadcasts go through NCCL.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .base import CommunicationError, Done, Pending, Transport
from .torch_dist import TorchDistTransport


class _EventPending(Pending):
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


class CopyEngineTransport(Transport):
    """All-to-all through symmetric memory and the copy engines (one host, CUDA)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self._nccl = TorchDistTransport(group)
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
        torch.cuda.current_stream().wait_stream(self._stream)  # the old buffer's last use is done
        self._views.clear()
        self._buf = self._hdl = None
        try:
            buf = self._symm.empty(self.world_size * cap, dtype=torch.uint8, device=self.device)
            self._hdl = self._symm.rendezvous(buf, self._group_name)
        except Exception as e:  # noqa: BLE001 - say what failed and what to use instead
            raise CommunicationError(
                f"ep: rank {self.rank}: symmetric memory for the copy-engine transport failed ({type(e).__name__}: "
                f"{e}); it needs all ranks on one host with peer access; use MoEConfig(transport='nccl')"
            ) from e
        self._buf, self._cap = buf, cap

    def _view(self, peer: int, dtype: torch.dtype) -> torch.Tensor:
        key = (peer, dtype)
        if key not in self._views:
            es = torch.empty(0, dtype=dtype).element_size()
            self._views[key] = self._hdl.get_buffer(peer, (self.world_size * self._cap // es,), dtype, 0)
        return self._views[key]

    # -- the all-to-all ----------------------------------------------------------------
    def all_to_all(self, out, inp, out_splits: Sequence[int], in_splits: Sequence[int], label: str = "all-to-all") -> Pending:
        n, me = self.world_size, self.rank
        if n == 1:
            out.copy_(inp)
            return Done()
        inp = inp.contiguous()
        row_el = inp[0].numel() if inp.dim() > 1 else 1
        es = inp.element_size()
        most = max(max(in_splits), max(out_splits))
        if most > self._rows:
            raise CommunicationError(
                f"ep: rank {me}: {label} sends or receives {most} rows for one peer, more than the {self._rows} "
                "reserved (an internal error: the plan reserves the largest token count of any rank)"
            )
        if self._rows * row_el * es > self._cap:
            self._grow(self._rows * row_el * es)
        cur = torch.cuda.current_stream()
        s = self._stream
        s.wait_stream(cur)  # inp is ready, out is free
        flat_in, flat_out = inp.view(-1), out.view(-1)
        in_off = [0]
        for c in in_splits:
            in_off.append(in_off[-1] + c)
        out_off = [0]
        for c in out_splits:
            out_off.append(out_off[-1] + c)
        slot_el = self._cap // es
        try:
            with torch.cuda.stream(s):
                self._hdl.barrier(channel=0)  # every slot free: owners copied the last call's rows out
                for j in range(1, n):
                    p = (me + j) % n
                    ps = self._peer_streams[p]
                    ps.wait_stream(s)
                    cnt = in_splits[p] * row_el
                    if cnt:
                        with torch.cuda.stream(ps):
                            dst = self._view(p, inp.dtype)[me * slot_el: me * slot_el + cnt]
                            dst.copy_(flat_in[in_off[p] * row_el: in_off[p] * row_el + cnt], non_blocking=True)
                if out_splits[me]:
                    flat_out[out_off[me] * row_el: out_off[me + 1] * row_el].copy_(
                        flat_in[in_off[me] * row_el: in_off[me + 1] * row_el], non_blocking=True)
                for j in range(1, n):
                    s.wait_stream(self._peer_streams[(me + j) % n])
                self._hdl.barrier(channel=0)  # every copy into every slot has landed
                mine = self._view(me, inp.dtype)
                for src in range(n):
                    cnt = out_splits[src] * row_el
                    if src != me and cnt:
                        flat_out[out_off[src] * row_el: out_off[src] * row_el + cnt].copy_(
                            mine[src * slot_el: src * slot_el + cnt], non_blocking=True)
                done = torch.cuda.Event()
                done.record(s)
        except Exception as e:  # noqa: BLE001
            raise CommunicationError(f"ep: rank {me} failed starting {label}: {type(e).__name__}: {e}") from e
        # the caller may free inp/out while the copies run: tell the allocator who uses them
        for t in (inp, out):
            t.record_stream(s)
            for j in range(1, n):
                t.record_stream(self._peer_streams[(me + j) % n])
        return _EventPending(done)

    def exchange(self, inp: torch.Tensor, label: str = "exchange") -> torch.Tensor:
        return self._nccl.exchange(inp, label)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._nccl.broadcast_(tensor, src)

