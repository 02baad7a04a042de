"""`MoEConfig`: the shape and the knobs of one expert-parallel MoE layer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TRANSPORTS = ("nccl", "copy_engine", "device_put")
WAVE_SPLITS = ("tokens", "experts")
EXPERT_DTYPES = (None, torch.float8_e4m3fn)
FP8_SCALINGS = ("blocks", "rows")
FP8_PRODUCTS = ("both", "linear1", "linear2", "auto")
FP8_PRODUCT_FLAGS = {"both": (True, True), "linear1": (True, False), "linear2": (False, True)}
"""`fp8_products` fixed by name -> (linear1 in FP8, linear2 in FP8)."""
FP8_BACKWARDS = ("none", "data")
FP8_FAST_ACCUMS = (False, True, "all")
WEIGHT_CACHES = ("eval", "always", "graphs", "never")
FP8_BLOCK = 128  # the side of FP8 scale blocks (1x128 activation tiles, 128x128 weight blocks)


@dataclass(frozen=True)
class MoEConfig:
    """Shape and knobs of an `ExpertParallelMoE` layer.

    Args:
        hidden: H, the model's hidden size (the width of `x`).
        ffn_hidden: F, each expert's inner width (SwiGLU: `w1` is `[H, 2F]`).
        num_experts: E, experts over all ranks; must divide evenly by the world size.
        top_k: k, experts per token, 1 <= k <= E.
        num_waves: W, how many waves the layer's work is cut into (`wave_split` says how);
            each wave has its own dispatch and combine all-to-all, so the expert math of
            wave w runs while wave w+1 is in flight and wave w-1's results travel back.
            1 is the plain sequential path. "auto": the layer's first forward picks W
            (once per process, shape and power of two of the token count; the same W on
            every rank; `ep.auto`).
        wave_split: "tokens" (wave w is the w-th of W chunks of every rank's tokens, through
            all local experts: each wave carries 1/W of the bytes) or "experts" (wave w is
            the w-th contiguous group of each rank's local experts; W may not exceed
            E_local, and waves differ in size by at most one expert). Either way one plan
            and one pipeline (`ep.plan`, `ep.pipeline`): buffers have sizes fixed by bounds
            known before the call, and on CUDA the layer never waits for the device, so it
            can be captured in a CUDA graph.
        max_tokens: the most tokens any rank passes to one call. Given, the
            buffers are sized from it and the call makes no host exchange at all; None:
            each call's ranks agree on their largest token count in one small exchange
            between the hosts (no device sync).
        capacity_factor: in (0, 1]: the share of the worst case (every token of a wave sent
            to every rank; with expert waves every token of the call, since any token may
            have a route in any wave) that each rank's receive buffers hold, per sending
            rank and wave. 1 never overflows; lower saves memory, and a call
            whose routes do not fit raises `InputError` on every rank (on CUDA at the
            rank's next call, or `ExpertParallelMoE.check_errors()`): never a silent drop.
        score_func: "softmax" (over all E), "sigmoid", or "sqrtsoftplus"
            (`sqrt(softplus(logit))`, DeepSeek-V4's).
        norm_topk: renormalise the k selected scores to sum to 1.
        n_group, topk_group: group-limited choice (DeepSeek-V3's): the E experts form
            `n_group` equal groups; a group's score is the sum of its two highest biased
            scores, and a token chooses its k experts from its `topk_group` best groups
            only. 1, 1 (the default): no groups.
        routed_scaling_factor: the routing weights (after `norm_topk`) are multiplied by it.
        swiglu_limit: None, or the clamp of the routed and shared experts' SwiGLU input
            (DeepSeek-V4's): `gate.clamp(max=limit)`, `up.clamp(-limit, limit)` before
            `silu(gate) * up`.
        num_shared_experts: 0, or the width of the dense shared expert beside the routed
            ones in units of `ffn_hidden` (`Fs = ffn_hidden * num_shared_experts`);
            `y = routed(x) + shared(x)`, replicated on every rank like the router.
        expert_dtype: None (the products in the parameters' dtype) or `torch.float8_e4m3fn`:
            linear1 and linear2 in FP8 (`ep.kernels.fp8`, the recipe `fp8_scaling` says): the
            expert weights quantized once per call and shared by every wave (or kept between
            calls, `weight_cache`, or held, `ExpertParallelMoE.hold_fp8_experts`), each item's
            row quantized, SwiGLU fused with linear2's input quantization, products
            accumulated in fp32; outputs in the layer's dtype. Backward: gradients in the
            layer's dtype from the saved activations (straight through the quantization),
            with the unquantized weights or, where `fp8_backward` says, in FP8. H and F must
            be multiples of 128.
        fp8_scaling: the FP8 experts' recipe. "blocks" (DeepSeek's): 1x128 activation tiles,
            128x128 weight blocks, the products in Triton on CUDA. "rows": one scale per
            row of the activations and one per output column of each expert, the products
            by `torch._scaled_grouped_mm` (CUDA sm90/sm100; faster on Hopper, less accurate
            where a row has outliers: README, Precision); elsewhere both are emulated in fp32.
        fp8_products: which of the FP8 experts' products run in FP8 (the other in the layer's
            dtype): "both" (default), "linear1", "linear2", or "auto": the fastest of the four
            (both, either, neither), timed on the layer's own call at its first call of each
            shape (`ep.auto`, as `num_waves="auto"`: the slowest rank's time decides, every
            rank keeps the same choice), so FP8 is never used where it measured slower
            (e.g. where the FP8 product is slower than bf16's, or in training where
            quantizing the weights every call costs more than FP8 saves). Needs
            `expert_dtype`; "auto" needs an eager call before a CUDA graph capture.
        fp8_backward: "none" (default: the backward's products in the layer's dtype) or
            "data": the data gradients of each product that runs in FP8 (`fp8_products`),
            `dz @ w2^T` and `dh @ w1^T`, in FP8 too, the rowwise recipe whatever
            `fp8_scaling` is: the gradient rows quantized with one scale each, the weights
            with one scale per row of `w` (a column of `w^T`), made in the backward or kept
            as `weight_cache` says; the weight gradients stay in the layer's dtype. Needs
            `expert_dtype`.
        fp8_fast_accum: False (default), True or "all". True: the forward's FP8 products
            accumulate in the tensor cores' own accumulator over all of K
            (`torch._scaled_grouped_mm`'s `use_fast_accum`, TransformerEngine's and torchao's
            default for the forward product) instead of promoting partial sums to fp32 at
            intervals along K (the default; DeepSeek's recipe promotes every 128 of K);
            faster, less accurate over long K (README, Precision); the backward's FP8
            products promote. "all": the backward's FP8 data products too
            (`fp8_backward="data"`; TransformerEngine and DeepSeek promote there). Needs
            `expert_dtype` and `fp8_scaling="rows"` (the blockwise product promotes by
            construction).
        dispatch_dtype: None (rows travel in the layer's dtype) or `torch.float8_e4m3fn`: each
            token quantized once before dispatch, in 1x128 tiles with fp32 scales (DeepEP's
            FP8 dispatch: at H=7168 a token is 7,168 + 224 bytes on the wire against
            14,336), linear1 reads the FP8 rows (dequantized first unless `expert_dtype` is
            FP8 too); the combine and every gradient stay in the layer's dtype (the weight
            gradient of linear1 from the dequantized rows). H must be a multiple of 128.
        weight_cache: when the layer keeps the weights it derives from its parameters (their
            casts under autocast, their FP8 quantization) between calls, while the parameters
            are unchanged (`ep.weight_cache`): "eval" (default: in eval mode, i.e. inference),
            "always" (also in training: microbatches of one step share them), "graphs" (as
            "always", and CUDA graph captures read the kept copies instead of deriving inside:
            call `ExpertParallelMoE.refresh_weight_cache()` after each optimizer step, before
            the step's replays), "never". A kept copy costs the experts' size in the derived
            dtype; otherwise nothing is kept or read from the cache while a CUDA graph is
            captured (the capture derives its own).
        timeout_s: the longest any wait inside the layer lasts on Gloo (CPU) ranks, however
            the process group was made: a stalled or dead peer becomes a
            `CommunicationError` naming the stage and wave waited for. With
            `transport="device_put"` also the longest device-side wait (reported at the
            next call, or by `ExpertParallelMoE.check_errors()`). On NCCL the layer
            never waits on the host; there NCCL's watchdog ends a hung collective after
            the group's own timeout (`ep.init_distributed(timeout_s=...)`).
        dedup_across_waves: "experts" split: a token travels to a rank once, in the first wave that needs
            it there, and that rank's later waves reuse its row (True: W=1's dispatch bytes
            for any W); or once per (rank, wave) (False). Either way each wave's results
            come back in that wave's combine, summed over the wave's experts on the rank.
        sm_carveout: on CUDA, SMs the grouped GEMMs leave free for communication
            kernels while waves are in flight (0: none). Ignored on CPU.
        transport: how rows move between ranks: "nccl" (torch.distributed's all-to-all:
            NCCL on GPUs, Gloo on CPUs) or "copy_engine" (CUDA ranks of one host: peer
            copies into symmetric memory by the copy engines, no SMs; see
            `ep.transport.copy_engine`) or "device_put" (CUDA ranks of one host: Triton
            kernels on a few SMs store the rows into the peers' symmetric memory and
            signal them there; every wait is on the device, bounded by `timeout_s`; see
            `ep.transport.device_put`).
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
    wave_split: str = "tokens"
    max_tokens: Optional[int] = None
    capacity_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    swiglu_limit: Optional[float] = None
    num_shared_experts: int = 0
    timeout_s: float = 60.0
    expert_dtype: Optional[torch.dtype] = None
    dispatch_dtype: Optional[torch.dtype] = None
    fp8_scaling: str = "blocks"
    fp8_products: str = "both"
    fp8_backward: str = "none"
    fp8_fast_accum: Union[bool, str] = False
    weight_cache: str = "eval"

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn_hidden", "num_experts", "top_k", "num_waves", "n_group", "topk_group"):
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
        for name in ("sm_carveout", "num_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be an int >= 0, got {value!r}")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"MoEConfig.n_group must divide num_experts ({self.num_experts}), got {self.n_group}"
            )
        group_size = self.num_experts // self.n_group
        if self.n_group > 1 and group_size < 2:
            raise ValueError(
                f"MoEConfig.n_group must leave at least 2 experts per group (a group scores by its two best), "
                f"got {self.n_group} groups of {self.num_experts} experts"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group must be <= n_group ({self.n_group}), got {self.topk_group}")
        if self.top_k > self.topk_group * group_size:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) must be <= the experts of the topk_group best groups "
                f"({self.topk_group} x {group_size})"
            )
        for name, allow_none in (("routed_scaling_factor", False), ("swiglu_limit", True), ("timeout_s", False)):
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                what = "None or a finite number > 0" if allow_none else "a finite number > 0"
                raise ValueError(f"MoEConfig.{name} must be {what}, got {value!r}")
        if self.wave_split not in WAVE_SPLITS:
            raise ValueError(f"MoEConfig.wave_split must be one of {WAVE_SPLITS}, got {self.wave_split!r}")
        if self.max_tokens is not None and (
                isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"MoEConfig.max_tokens must be None or a positive int, got {self.max_tokens!r}")
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) \
                or not 0 < self.capacity_factor <= 1:
            raise ValueError(f"MoEConfig.capacity_factor must be a number in (0, 1], got {self.capacity_factor!r}")

        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"MoEConfig.expert_dtype must be None or torch.float8_e4m3fn, got {self.expert_dtype!r}")
        if self.expert_dtype is not None and (self.hidden % FP8_BLOCK or self.ffn_hidden % FP8_BLOCK):
            raise ValueError(f"MoEConfig.expert_dtype={self.expert_dtype}: hidden ({self.hidden}) and ffn_hidden "
                             f"({self.ffn_hidden}) must be multiples of {FP8_BLOCK} (FP8 scale blocks)")
        if self.dispatch_dtype not in EXPERT_DTYPES:
            raise ValueError(f"MoEConfig.dispatch_dtype must be None or torch.float8_e4m3fn, got {self.dispatch_dtype!r}")
        if self.dispatch_dtype is not None and self.hidden % FP8_BLOCK:
            raise ValueError(f"MoEConfig.dispatch_dtype={self.dispatch_dtype}: hidden ({self.hidden}) must be a "
                             f"multiple of {FP8_BLOCK} (1x{FP8_BLOCK} scale tiles)")
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"MoEConfig.fp8_scaling must be one of {FP8_SCALINGS}, got {self.fp8_scaling!r}")
        if self.fp8_products not in FP8_PRODUCTS:
            raise ValueError(f"MoEConfig.fp8_products must be one of {FP8_PRODUCTS}, got {self.fp8_products!r}")
        if self.fp8_products != "both" and self.expert_dtype is None:
            raise ValueError(f"MoEConfig.fp8_products={self.fp8_products!r} needs expert_dtype=torch.float8_e4m3fn "
                             "(without FP8 experts every product is in the layer's dtype)")
        if self.fp8_backward not in FP8_BACKWARDS:
            raise ValueError(f"MoEConfig.fp8_backward must be one of {FP8_BACKWARDS}, got {self.fp8_backward!r}")
        if self.fp8_backward != "none" and self.expert_dtype is None:
            raise ValueError(f"MoEConfig.fp8_backward={self.fp8_backward!r} needs expert_dtype=torch.float8_e4m3fn")
        # (the type first: 1 == True, so membership alone would take 1)
        if not isinstance(self.fp8_fast_accum, (bool, str)) or self.fp8_fast_accum not in FP8_FAST_ACCUMS:
            raise ValueError(f"MoEConfig.fp8_fast_accum must be one of {FP8_FAST_ACCUMS}, got {self.fp8_fast_accum!r}")
        if self.fp8_fast_accum and (self.expert_dtype is None or self.fp8_scaling != "rows"):
            raise ValueError(f"MoEConfig.fp8_fast_accum={self.fp8_fast_accum!r} needs expert_dtype=torch.float8_e4m3fn "
                             f"and fp8_scaling='rows' (got expert_dtype={self.expert_dtype}, fp8_scaling="
                             f"{self.fp8_scaling!r}; the blockwise product promotes every 128 of K by construction)")
        if self.fp8_fast_accum == "all" and self.fp8_backward != "data":
            raise ValueError("MoEConfig.fp8_fast_accum='all' needs fp8_backward='data' (without it the backward has "
                             f"no FP8 products), got fp8_backward={self.fp8_backward!r}")
        if self.weight_cache not in WEIGHT_CACHES:
            raise ValueError(f"MoEConfig.weight_cache must be one of {WEIGHT_CACHES}, got {self.weight_cache!r}")

    def num_local_experts(self, world_size: int) -> int:
        """E_local = E / n; raises if E does not divide evenly, or (experts split) W exceeds it."""
        if self.num_experts % world_size:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by the world "
                f"size ({world_size})"
            )
        local = self.num_experts // world_size
        if self.wave_split == "experts" and self.num_waves != "auto" and self.num_waves > local:
            raise ValueError(
                f"MoEConfig.num_waves ({self.num_waves}) must be <= the local experts per rank "
                f"({local} = {self.num_experts} experts / {world_size} ranks)"
            )
        return local
