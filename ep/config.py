"""`MoEConfig`: the shape and the knobs of one expert-parallel MoE layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

SCORE_FUNCS = ("softmax", "sigmoid")
TRANSPORTS = ("nccl", "copy_engine")


@dataclass(frozen=True)
class MoEConfig:
    """Shape and knobs of an `ExpertParallelMoE` layer.

    Args:
        hidden: H, the model's hidden size (the width of `x`).
        ffn_hidden: F, each expert's inner width (SwiGLU: `w1` is `[H, 2F]`).
        num_experts: E, experts over all ranks; must divide evenly by the world size.
        top_k: k, experts per token, 1 <= k <= E.
        num_waves: W, how many contiguous groups each rank's local experts are split
            into; each group (wave) has its own dispatch and combine all-to-all, so the
            expert math of wave w runs while wave w+1 is in flight. 1 is the plain
            sequential path. When E_local is not a multiple of W the waves differ in
            size by at most one expert; W may not exceed E_local (checked by the layer,
            which knows the world size). "auto": the layer's first forward measures the
            group's all-to-all, its expert math and the host's call cost (once per
            process, shape and power of two of the token count), plays the schedule
            model `ep.sim` for W in 1, 2, 4, 8
            and keeps the fastest (the same W on every rank; `ep.auto`).
        score_func: "softmax" (over all E) or "sigmoid".
        norm_topk: renormalise the k selected scores to sum to 1.
        dedup_across_waves: a token travels to a rank once, in the first wave that needs
            it there, and its summed result comes back once, after the last (True: W=1's
            bytes for any W); or once per (rank, wave) (False: more bytes, but each
            wave's transfers hold only that wave's rows).
        sm_carveout: on CUDA, SMs the grouped GEMMs leave free for communication
            kernels while waves are in flight (0: none). Ignored on CPU.
        transport: how rows move between ranks: "nccl" (torch.distributed's all-to-all:
            NCCL on GPUs, Gloo on CPUs) or "copy_engine" (CUDA ranks of one host: peer
            copies into symmetric memory by the copy engines, no SMs; see
            `ep.transport.copy_engine`).
    """

    hidden: int
    ffn_hidden: int
    num_experts: int
    top_k: int
    num_waves: Union[int, str] = 1
    score_func: str = "softmax"
    norm_topk: bool = True
    dedup_across_waves: bool = True
    sm_carveout: int = 0
    transport: str = "nccl"

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn_hidden", "num_experts", "top_k", "num_waves"):
            value = getattr(self, name)
            if name == "num_waves" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                what = "a positive int or 'auto'" if name == "num_waves" else "a positive int"
                raise ValueError(f"MoEConfig.{name} must be {what}, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(
                f"MoEConfig.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}"
            )
        for name in ("norm_topk", "dedup_across_waves"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"MoEConfig.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if isinstance(self.sm_carveout, bool) or not isinstance(self.sm_carveout, int) or self.sm_carveout < 0:
            raise ValueError(f"MoEConfig.sm_carveout must be an int >= 0, got {self.sm_carveout!r}")

    def num_local_experts(self, world_size: int) -> int:
        """E_local = E / n; raises if E does not divide evenly or W exceeds it."""
        if self.num_experts % world_size:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by the world "
                f"size ({world_size})"
            )
        local = self.num_experts // world_size
        if self.num_waves != "auto" and self.num_waves > local:
            raise ValueError(
                f"MoEConfig.num_waves ({self.num_waves}) must be <= the local experts per rank "
                f"({local} = {self.num_experts} experts / {world_size} ranks)"
            )
        return local
