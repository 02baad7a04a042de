"""`ExpertParallelMoE`: router -> plan -> pipeline (transport, experts, kernels)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, compiled
from .checks import STATUS_SLOTS, X_TOKENS, InputError, PostedFindings, check_same_config, host_status, raise_on_problems
from .config import FP8_PRODUCT_FLAGS, MoEConfig
from .dist import as_process_group
from .experts import Experts, in_recipe, quantize_expert_weight, quantize_experts, quantize_transposed_weight
from .kernels.fp8 import Fp8Experts, Fp8Weight
from .pipeline import outside_graph_pools, run_beside, wave_experts
from .plan import WaveMap, WavePlan, sender_plan
from .router import Router
from .shared import SharedExperts
from .transport import Transport, make_transport
from .weight_cache import DerivedWeights, given_cast


class ExpertParallelMoE(nn.Module):
    """A Mixture-of-Experts layer whose experts are spread over the ranks of `group`.

    Rank r of n owns global experts `r*E/n ... (r+1)*E/n - 1`. Parameters:
    `router.weight [E, H]` and the buffer `router.e_score_correction_bias [E]` (float32),
    `experts.w1 [E_local, H, 2F]` (gate columns `[:F]`, up `[F:]`), `experts.w2 [E_local, F, H]`,
    and with `num_shared_experts` > 0 `shared_experts.w1 [H, 2Fs]`, `shared_experts.w2 [Fs, H]`.
    The router and the shared experts are replicated: the first forward checks that every
    rank has the same configuration and broadcasts them from the group's rank 0.

    Construction makes no collective (the layer can be built on the meta device, then
    `to_empty(device=...)` and `reset_parameters()`).

    Forward, numbered as it runs:
        0. (first forward only) the configuration check and the replicated weights' broadcast;
        1. route: logits `x @ router.weight.T` in at least fp32, scores, top-k of the biased
           scores (within the best groups), weights (skipped when the caller passes
           `topk_idx` and `topk_weights`);
        2. plan: the largest token count of any rank (`max_tokens`, or one exchange between
           the hosts), the wave map (token chunks or local expert groups), then each route's
           row in the fixed regions of its wave and each touch's returned row, on the device
           (`ep.plan`);
        3. shared experts (when configured): issued beside the first dispatch;
        4. waves: dispatch, linear1, linear2, combine of wave w while wave w+1 is in flight
           (`ep.pipeline`); backward runs the mirror schedule. The layer never reads the
           device on the host: input problems found there raise at once on the CPU and at
           the next call on CUDA (or `check_errors()`).

    Under `torch.autocast(device_type, dtype)` the layer computes as `nn.Linear` does: x and
    the expert weights (routed and shared) are cast to the autocast dtype (per call, or kept
    while the weights are unchanged: `MoEConfig.weight_cache`), the output has that dtype,
    and the parameters get gradients in their own dtype; the router keeps its weight's dtype
    and its logits stay in at least fp32 (`_forward_autocast`).
    Under `torch.compile` with `max_tokens` set, Dynamo traces the layer (`fullgraph=True`
    too): the engine is a set of custom ops (`ep.compiled`); without `max_tokens` the layer
    runs eagerly behind a graph break.

    Args:
        config: the layer's shape and knobs.
        group: the expert-parallel process group, or a one-dimensional `DeviceMesh` (e.g.
            `mesh["ep"]` of a 2-D mesh; a mesh of more dimensions raises ValueError); None is
            the default group (or a one-process world when torch.distributed is not initialised).
        transport: optional, a transport to use instead of the one `config.transport` names
            for `group` (one made by hand, e.g. an `ep.transport.Transport` of your own).
    """

    def __init__(self, config: MoEConfig, group: Optional[dist.ProcessGroup] = None,
                 transport: Optional[Transport] = None) -> None:
        super().__init__()
        group = as_process_group(group, "ExpertParallelMoE(group=...)")
        self.config = config
        self.transport = transport if transport is not None else make_transport(group, config.transport, config.timeout_s)
        self.num_local_experts = config.num_local_experts(self.transport.world_size)
        self.router = Router(config)
        self.experts = Experts(self.num_local_experts, config.hidden, config.ffn_hidden)
        self.shared_experts: Optional[SharedExperts] = None
        if config.num_shared_experts:
            self.shared_experts = SharedExperts(
                config.hidden, config.ffn_hidden * config.num_shared_experts, config.swiglu_limit
            )
        self.num_waves: Optional[int] = None if config.num_waves == "auto" else config.num_waves
        """W in use: the config's, or for "auto" the one chosen at the first forward."""
        self.fp8_products: Optional[Tuple[bool, bool]] = FP8_PRODUCT_FLAGS.get(config.fp8_products)
        """Whether linear1 and linear2 run in FP8: the config's (`MoEConfig.fp8_products`), or for
        "auto" the choice of the last forward (None before the first)."""
        self._replicas_synced = False  # the first forward checks the config and broadcasts the replicas
        self._posted = PostedFindings(outside_graph_pools)
        """Device findings of earlier calls (on CUDA), raised at the next call."""
        self._derived = DerivedWeights(outside_graph_pools)
        """Weights derived from the parameters (autocast casts, FP8 experts), kept between calls
        as `MoEConfig.weight_cache` says (`ep.weight_cache`)."""
        self._held_fp8: Optional[Fp8Experts] = None
        """FP8 experts the user asked the layer to hold (`hold_fp8_experts`)."""
        checkpoint.install(self)  # state_dict: experts as DTensors [E, ...], Shard(0) over the EP mesh (ep/checkpoint.py)
        self._compile_handle = compiled.register(self)  # how a compiled graph's ops find this layer

    def __setstate__(self, state) -> None:  # a copy (copy.deepcopy, pickle) is a layer of its own to compiled graphs
        super().__setstate__(state)
        self._compile_handle = compiled.register(self)

    def reset_parameters(self) -> None:
        """Fresh initial values (as construction draws them, in the same order)."""
        for module in (self.router, self.experts, self.shared_experts):
            if module is not None:
                module.reset_parameters()

    def replicated_tensors(self) -> List[torch.Tensor]:
        """The tensors every rank holds alike: the router's weight and bias, the shared experts'."""
        out = [self.router.weight, self.router.e_score_correction_bias]
        if self.shared_experts is not None:
            out += [self.shared_experts.w1, self.shared_experts.w2]
        return out

    def sync_replicas(self, tensors: Optional[List[torch.Tensor]] = None) -> None:
        """Collective, once (later calls return at once): every rank's config must agree (else
        `InputError` on every rank), then the replicated tensors (or `tensors`, stand-ins for
        them: the compiled path's copies) are broadcast from rank 0. The first forward calls
        it; call it before using `router` outside the layer."""
        if self._replicas_synced:
            return
        check_same_config(self.config, self.transport)
        with torch.no_grad():
            for t in self.replicated_tensors() if tensors is None else tensors:
                self.transport.broadcast_(t.data, src=0, label="replicated weights' broadcast (first forward)")
        self._replicas_synced = True

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world_size(self) -> int:
        return self.transport.world_size

    def forward(
        self,
        x: torch.Tensor,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Args:
            x: `[..., H]` in the parameters' dtype and device (under `torch.autocast`, any
                floating dtype: it is cast to the autocast dtype).
            topk_idx: optional `[T, k]` int64 global expert ids (T = x.numel() / H),
                distinct within a token; given together with `topk_weights`.
            topk_weights: optional `[T, k]` float, used as given (not renormalised).
        Returns:
            `[..., H]` like x.
        Raises:
            InputError: on every rank when the ranks' configurations differ (first forward),
                or any rank's input is invalid (wrong shape, dtype
                or device; expert ids out of range or repeated within a token; NaN/Inf
                weights, which is also how NaN/Inf router logits surface).
            CommunicationError: when a peer fails, dies or stalls: within `config.timeout_s` on
                Gloo, naming the stage and wave waited for (see `ep.transport.torch_dist`);
                with `transport="device_put"` at the next call after a device-side wait
                timed out (`ep.transport.device_put`).
        """
        if torch.compiler.is_compiling():  # Dynamo traces the layer: its engine as custom ops
            return compiled.forward(self, x, topk_idx, topk_weights)
        if torch.is_autocast_enabled(x.device.type):  # computes in the autocast dtype (once more, with it off)
            return self._forward_autocast(x, topk_idx, topk_weights)
        cfg = self.config
        self.transport.raise_errors()  # what the device saw go wrong in earlier calls
        self.sync_replicas()
        status = host_status(cfg, x, self.experts.w1, topk_idx, topk_weights)
        max_tokens = self._token_bound(status, num_tokens(cfg, x))
        W = cfg.num_waves
        if W == "auto":  # the same W on every rank: chosen from what all ranks measured
            from .auto import choose_waves

            if self.fp8_products is None:  # W is timed with both products in FP8, then the products at that W
                self.fp8_products = (True, True)
            W = choose_waves(self, x, topk_idx, topk_weights, status, max_tokens)
        self.num_waves = W
        if cfg.fp8_products == "auto":  # the same products on every rank: chosen from what all ranks measured
            from .auto import choose_fp8_products

            self.fp8_products = choose_fp8_products(self, x, topk_idx, topk_weights, status, max_tokens, W)
        return self._run(x, topk_idx, topk_weights, W, status, max_tokens)

    def _forward_autocast(self, x, topk_idx, topk_weights) -> torch.Tensor:
        """`forward` under `torch.autocast(device_type, dtype)`, as `nn.Linear` computes there:
        x and the expert weights (routed `experts.w1/w2`, `shared_experts.w1/w2`) cast to the
        autocast dtype (`_cast`), then `forward` with autocast off inside (so the router's
        logits stay in at least fp32 and no op inside is cast again). The casts are autograd
        ops: fp32 parameters get fp32 gradients. float64 tensors are not cast (autocast leaves
        them alone too). The router's weight is not cast: logits from the cast x and the
        router's own weight."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type)
        self.sync_replicas()  # first: the broadcast must reach the parameters, not this call's casts
        casts = {(module, name): self._cast(key, module._parameters[name], dtype)
                 for key, module, name in self._cast_weights()}
        with torch.autocast(device_type, enabled=False), _params_for_call(casts):
            return self.forward(_autocast(x, dtype), topk_idx, topk_weights)

    def _cast_weights(self) -> List[tuple]:
        """(key, module, parameter name) of the weights autocast casts: the routed and shared experts'."""
        out = [("experts.w1", self.experts, "w1"), ("experts.w2", self.experts, "w2")]
        if self.shared_experts is not None:
            out += [("shared_experts.w1", self.shared_experts, "w1"), ("shared_experts.w2", self.shared_experts, "w2")]
        return out

    def _cast(self, key: str, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`param` as autocast casts it (`_autocast`): a differentiable cast to `dtype`, made
        this call or kept from an earlier one (`_derive`)."""
        if not _autocast_casts(param, dtype):  # (a predicate: casting to find out cost a full cast per call, r39a)
            return param
        return given_cast(param, self._derive(("cast", key, dtype), (param,), lambda: param.detach().to(dtype)))

    def _fp8_experts(self, w1: torch.Tensor, w2: torch.Tensor) -> Optional[Fp8Experts]:
        """The experts in FP8 for this call's forward products (`MoEConfig.expert_dtype`,
        `fp8_scaling`; None for a product `fp8_products` leaves in the layer's dtype): held,
        quantized now, or kept from an earlier call (`_derive`)."""
        cfg = self.config
        if cfg.expert_dtype is None or not any(self.fp8_products):
            return None
        if self._held_fp8 is not None:
            w1, w2, make = self._held_fp8.w1, self._held_fp8.w2, lambda i, w: w
        else:
            make = lambda i, w: self._derive(  # noqa: E731
                ("fp8", cfg.fp8_scaling, i), (w,), lambda: quantize_expert_weight(w, cfg.fp8_scaling))
        return self._per_fp8_product(w1, w2, make, bool(cfg.fp8_fast_accum))

    def _fp8_transposed_experts(self, w1: torch.Tensor, w2: torch.Tensor) -> Optional[Fp8Experts]:
        """The weights' transposes in FP8 for the backward's data products
        (`MoEConfig.fp8_backward="data"`: each product that runs in FP8 forward, per
        `fp8_products`), quantized in the backward or kept from an earlier one (`_derive`);
        fast accumulation with `MoEConfig.fp8_fast_accum="all"`."""
        cfg = self.config
        if cfg.fp8_backward == "none" or not any(self.fp8_products):
            return None
        return self._per_fp8_product(w1, w2, lambda i, w: self._derive(
            ("fp8 transposed", i), (w,), lambda: quantize_transposed_weight(w)), cfg.fp8_fast_accum == "all")

    def _per_fp8_product(self, w1, w2, make: Callable[[int, object], Fp8Weight],
                         fast_accum: bool = False) -> Fp8Experts:
        """`make(i, w)` for each product i (0: linear1's w1, 1: linear2's w2) that
        `fp8_products` runs in FP8, None for the others (`fast_accum`: `Fp8Experts`')."""
        return Fp8Experts(*(make(i, w) if on else None for i, (w, on) in enumerate(zip((w1, w2), self.fp8_products))),
                          fast_accum=fast_accum)

    def hold_fp8_experts(self, experts: Optional[Fp8Experts] = None) -> None:
        """Inference with FP8 experts: hold them and use them in every later forward, CUDA graph
        captures included (a capture never reads a kept copy of `weight_cache`, this it does),
        until `release_fp8_experts()`. Later changes to `experts.w1` / `w2` are not seen by the
        forward (the backward still uses them). `experts`: this rank's FP8 experts, e.g.
        `ep.hf.load_fp8_experts` of an FP8 checkpoint (no round trip through bf16); None: the
        parameters quantized now. They are put in the config's recipe once: 128x128 blocks held
        K-major, or for `fp8_scaling="rows"` requantized per column.

        Raises:
            ValueError: the config has no FP8 experts, or `experts` has the wrong shapes."""
        cfg = self.config
        if cfg.expert_dtype is None:
            raise ValueError("ExpertParallelMoE.hold_fp8_experts: MoEConfig.expert_dtype is None (no FP8 experts)")
        w1, w2 = self.experts.w1, self.experts.w2
        if experts is None:
            experts = quantize_experts(w1, w2, cfg.fp8_scaling)
        for got, want, name in ((experts.w1.q, w1, "w1"), (experts.w2.q, w2, "w2")):
            if got.shape != want.shape:
                raise ValueError(f"ExpertParallelMoE.hold_fp8_experts: {name} is {tuple(got.shape)}, the layer's "
                                 f"experts.{name} is {tuple(want.shape)}")
        self._held_fp8 = in_recipe(experts, cfg.fp8_scaling)

    def release_fp8_experts(self) -> None:
        """Stop holding FP8 experts (`hold_fp8_experts`): the forward quantizes the parameters again."""
        self._held_fp8 = None

    def _derive(self, name: tuple, sources: Tuple[torch.Tensor, ...], make):
        """`make()`, or its value kept from an earlier call whose `sources` were the same unchanged
        tensors (`ep.weight_cache`), as `MoEConfig.weight_cache` says: "eval" keeps them in eval
        mode, "always" also in training, "never" not at all. A call that keeps nothing drops
        what earlier calls kept (so training does not hold eval's copies); "graphs" keeps them
        always and CUDA graph captures read them (`refresh_weight_cache`)."""
        if self._keeps_derived():
            return self._derived.get((*name, torch.is_inference_mode_enabled()), sources, make,
                                     in_captures=self.config.weight_cache == "graphs")
        self._derived.clear()
        return make()

    def _keeps_derived(self) -> bool:
        """Whether this call keeps the weights it derives (`MoEConfig.weight_cache`)."""
        mode = self.config.weight_cache
        return mode in ("always", "graphs") or (mode == "eval" and not self.training)

    def clear_weight_cache(self) -> None:
        """Drop the weights kept between calls (`MoEConfig.weight_cache`). Needed only after
        changing the parameters in a way torch does not track (through `.data`); any other
        in-place change is seen at the next call. Weights a CUDA graph reads
        (`weight_cache="graphs"`) are derived again in place instead of dropped."""
        self._derived.clear()

    def refresh_weight_cache(self) -> int:
        """With `MoEConfig.weight_cache="graphs"`: derive again, in place, every kept weight a
        CUDA graph capture read (their FP8 quantizations, autocast casts), from the parameters
        as they are now. Replays run no Python, so they read what the last eager call or
        refresh left: call it after each change of the parameters (each optimizer step)
        before the replays of that step (its microbatches share this one quantization). An
        eager call refreshes what it reads by itself. Returns how many weights were made."""
        return self._derived.refresh()

    def _token_bound(self, status: List[int], T: int) -> int:
        """The most tokens of any rank in this call, from `max_tokens` (a T above it is
        recorded in `status`), or one exchange between the hosts, which also raises every
        rank's host findings (`status`: this rank's) and earlier calls' device findings on
        every rank."""
        cfg, tr = self.config, self.transport
        earlier = self._posted.seen()
        if cfg.max_tokens is None:  # the ranks' hosts agree on the bound (and on earlier findings)
            S = STATUS_SLOTS
            mail = sum(earlier, []) if earlier else [0] * (tr.world_size * S)
            table = tr.host_exchange([T, *status, *mail], "token counts (host exchange)")
            seen = [max(col) for col in zip(*(row[1 + S:] for row in table))]  # what any rank's host has seen
            self._raise_found([seen[r * S:(r + 1) * S] for r in range(tr.world_size)], earlier=True)
            raise_on_problems([row[1:1 + S] for row in table], cfg, cfg.num_experts)
            return max(row[0] for row in table)
        self._raise_found(earlier, earlier=True)
        mark_over_bound(cfg, status, T)
        return cfg.max_tokens

    def _plan(self, topk_idx, topk_weights, W: int, status, max_tokens: int) -> WavePlan:
        """The wave plan of this call (`ep.plan.sender_plan`); `status` travels along when bad."""
        cfg = self.config
        waves = self.wave_map(W, max_tokens)
        return sender_plan(topk_idx, topk_weights, cfg.num_experts, self.world_size, waves,
                           waves.capacity(max_tokens, cfg.capacity_factor), max_tokens, status if any(status) else None)

    def wave_map(self, W: int, max_tokens: int) -> WaveMap:
        """The wave map of W waves (token waves: at most one wave per token of T_max)."""
        cfg = self.config
        if cfg.wave_split == "tokens":
            W = max(1, min(W, max_tokens))
        return WaveMap.of(cfg.wave_split, W, cfg.dedup_across_waves)

    def _run(self, x, topk_idx, topk_weights, W: int, status, max_tokens: int) -> torch.Tensor:
        cfg, tr = self.config, self.transport
        w1, w2 = self.experts.w1, self.experts.w2
        bad = any(status)
        if bad:  # take part with no tokens: the status travels with the rows to every rank
            x_TH, topk_idx, topk_weights = stand_ins(cfg, w1)
        else:
            x_TH = x.reshape(-1, cfg.hidden)
            if topk_idx is None:
                topk_idx, topk_weights = self.router(x_TH)
        plan = self._plan(topk_idx, topk_weights, W, status, max_tokens)
        if self.shared_experts is not None:  # issued first, it runs beside the first dispatch (on CUDA)
            shared_TH, join = run_beside(x_TH.device, lambda: self.shared_experts(x_TH))
        y_TH, found = wave_experts(x_TH, topk_weights, w1, w2, plan, tr, cfg.sm_carveout, cfg.swiglu_limit,
                                   self._fp8_experts(w1, w2), cfg.dispatch_dtype,
                                   None if cfg.fp8_backward == "none" else self._fp8_transposed_experts)
        if self.shared_experts is not None:
            join()
            y_TH = y_TH + shared_TH
        self._report(found, bad)
        return y_TH.view(x.shape)

    def _report(self, found: torch.Tensor, bad: bool) -> None:
        """The ranks' findings of this call: raised now where reading them is free (the CPU,
        or a call that is failing anyway), else posted for the next call."""
        if bad or not found.is_cuda:
            self._raise_found(found.tolist())
        else:
            self._posted.post(found)

    def _raise_found(self, found, earlier: bool = False) -> None:
        """Raise `InputError` for a `[n][STATUS_SLOTS]` table of findings, if any."""
        if found is None or not any(map(any, found)):
            return
        if earlier:
            self._posted.clear()
        try:
            raise_on_problems(found, self.config, self.config.num_experts)
        except InputError as e:
            if earlier:
                raise InputError(f"{e}\n(found on the device during an earlier call of this layer)") from None
            raise

    def check_errors(self) -> None:
        """Wait for the device and raise `InputError` for what earlier calls found there
        (on CUDA a call's input problems are reported at the next call; this is the
        explicit, blocking point). Collective only in the sense that every rank finds the
        same table: each rank may call it alone. Also raises `CommunicationError` for a
        device-side wait that timed out (`transport="device_put"`)."""
        found = self._posted.settle()
        if self.transport.device.type == "cuda":
            torch.cuda.synchronize(self.transport.device)
        self.transport.raise_errors()
        self._raise_found(found, earlier=True)


def num_tokens(cfg: MoEConfig, x: torch.Tensor) -> int:
    """T of an input (0 when its last dimension is not `hidden`: reported by `host_status`)."""
    return x.numel() // cfg.hidden if x.dim() and x.shape[-1] == cfg.hidden else 0


def mark_over_bound(cfg: MoEConfig, status: List[int], T: int) -> None:
    """Record in `status` a T above `MoEConfig.max_tokens`."""
    if cfg.max_tokens is not None and T > cfg.max_tokens:
        status[X_TOKENS] = T


def stand_ins(cfg: MoEConfig, w1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, topk_idx, topk_weights of no tokens: a rank with bad input takes part with these."""
    return (w1.new_empty(0, cfg.hidden), torch.empty(0, cfg.top_k, dtype=torch.int64, device=w1.device),
            w1.new_empty(0, cfg.top_k, dtype=torch.float32))


def _autocast_casts(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast casts `t` (an op's input) to `dtype`: floating tensors other than
    float64, of another dtype."""
    return t.is_floating_point() and t.dtype not in (torch.float64, dtype)


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as autocast casts an op's input: floating tensors other than float64 to `dtype`."""
    return t.to(dtype) if _autocast_casts(t, dtype) else t


@contextmanager
def _params_for_call(tensors) -> Iterator[None]:
    """For the duration of one call, each `(module, name)` parameter reads as the tensor given
    for it (autocast's differentiable casts); the parameters are back when the call returns
    or raises. The engine reads the weights from the modules when the call starts
    (`self.experts.w1`, the shared experts' forward) and passes them on: this is the seam
    through which autocast reaches it."""
    saved = [(module, name, module._parameters[name]) for module, name in tensors]
    try:
        for (module, name), t in tensors.items():
            module._parameters[name] = t
        yield
    finally:
        for module, name, param in saved:
            module._parameters[name] = param
