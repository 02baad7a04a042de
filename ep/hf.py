"""Checkpoints of `transformers` MoE blocks: DeepSeek-V4, DeepSeek-V3, Mixtral, Qwen3-MoE.

- `moe_config(hf_config, **overrides)`: the `MoEConfig` that computes what the model's block
  computes (`overrides`: the runtime's own knobs, e.g. `num_waves`).
- `load_block(layer, block_or_state_dict, prefix="")`: the block's weights into the layer,
  on every rank: the replicated router and shared experts whole, the routed experts only
  those this rank owns (FP8 checkpoints dequantized, below).
- `load_fp8_experts(layer, block_or_state_dict, prefix="")`: this rank's experts of an FP8
  block in the layer's layout, still FP8.
- `block_state_dict(layer, dst=0)`: collective; on rank `dst`, the layer's weights in the
  block's layout, every rank's experts gathered (None on the other ranks).
  `save_block(layer, block, dst=0)` writes them into a block on `dst`.
- `ExpertParallelBlock`, `replace_moe_blocks(model, group)`: the layer as a drop-in for the
  blocks of a `transformers` model (DeepSeek-V4's hash-routed blocks included).

Layouts (transformers 5 fuses each block's experts into two tensors):

    transformers block                             ep.ExpertParallelMoE
    gate.weight [E, H]                             router.weight [E, H]
    gate.e_score_correction_bias [E] (DeepSeek)    router.e_score_correction_bias [E] (float32)
    experts.gate_up_proj [E, 2F, H]                experts.w1 [E_local, H, 2F] = gate_up_proj[mine].mT
    experts.down_proj [E, H, F]                    experts.w2 [E_local, F, H]  = down_proj[mine].mT
    shared_experts.gate_proj.weight [Fs, H]  \\
    shared_experts.up_proj.weight [Fs, H]    /     shared_experts.w1 [H, 2Fs] = [gate.T | up.T]
    shared_experts.down_proj.weight [H, Fs]        shared_experts.w2 [Fs, H]  = down.T

FP8 checkpoints (transformers' fine-grained FP8, DeepSeek-V3's format): a quantized tensor
`name` (`float8_e4m3fn`, `[..., out, in]`) comes with `name + "_scale_inv"` (float32, or
`float8_e8m0fnu` for "ue8m0" checkpoints), `[..., ceil(out/128), ceil(in/128)]`, one scale
per 128x128 block, `w = weight * scale_inv` (so `experts.gate_up_proj_scale_inv`,
`shared_experts.gate_proj.weight_scale_inv`, ...). `load_block` dequantizes such tensors
into the layer's dtype (only this rank's experts). `load_fp8_experts` returns this rank's
experts in the layer's layout still in FP8, q and scales moved together, no high-precision
copy (`ep.kernels.fp8.Fp8Experts`), for an FP8 expert mode.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from .config import MoEConfig
from .dist import as_process_group
from .kernels.fp8 import BLOCK, FP8, Fp8Weight, Fp8Experts, expand_blocks
from .layer import ExpertParallelMoE

ROUTER, BIAS = "gate.weight", "gate.e_score_correction_bias"
GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"
SHARED_GATE, SHARED_UP, SHARED_DOWN = ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                                       "shared_experts.down_proj.weight")
HASH_TABLE = "gate.tid2eid"
SCALE_INV = "_scale_inv"
"""A quantized tensor's block scales are under its name plus this (transformers' naming)."""


def moe_config(hf_config, **overrides) -> MoEConfig:
    """The layer's configuration for the MoE blocks of a `transformers` model config.

    Args:
        hf_config: a `DeepseekV4Config`, `DeepseekV3Config`, `MixtralConfig` or `Qwen3MoeConfig`.
        overrides: further `MoEConfig` fields (num_waves, transport, timeout_s, ...).
    Raises:
        ValueError: for another model type, or a block option the layer does not compute
            (an activation other than SiLU, Mixtral's router jitter).
    """
    kind = hf_config.model_type
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"ep.hf: {kind}.hidden_act={hf_config.hidden_act!r}: the layer's experts are SwiGLU (silu)")
    c = hf_config
    if kind == "deepseek_v4":
        # the block ignores norm_topk_prob (it always renormalises) and n_shared_experts
        # (its shared MLP is moe_intermediate_size wide); it has no groups
        fields = dict(ffn_hidden=c.moe_intermediate_size, num_experts=c.n_routed_experts, score_func=c.scoring_func,
                      norm_topk=True, routed_scaling_factor=float(c.routed_scaling_factor),
                      swiglu_limit=float(c.swiglu_limit), num_shared_experts=1)
    elif kind == "deepseek_v3":
        # the block scores by sigmoid whatever the config says
        fields = dict(ffn_hidden=c.moe_intermediate_size, num_experts=c.n_routed_experts, score_func="sigmoid",
                      norm_topk=bool(c.norm_topk_prob), routed_scaling_factor=float(c.routed_scaling_factor),
                      n_group=c.n_group or 1, topk_group=c.topk_group or 1, num_shared_experts=c.n_shared_experts or 0)
    elif kind == "mixtral":
        if c.router_jitter_noise:
            raise ValueError("ep.hf: mixtral.router_jitter_noise > 0 (random input scaling in training) is not supported")
        fields = dict(ffn_hidden=c.intermediate_size, num_experts=c.num_local_experts, score_func="softmax",
                      norm_topk=True)
    elif kind == "qwen3_moe":
        fields = dict(ffn_hidden=c.moe_intermediate_size, num_experts=c.num_experts, score_func="softmax",
                      norm_topk=bool(c.norm_topk_prob))
    else:
        raise ValueError(f"ep.hf: model type {kind!r} is not one of deepseek_v4, deepseek_v3, mixtral, qwen3_moe")
    fields.update(hidden=c.hidden_size, top_k=c.num_experts_per_tok)
    fields.update(overrides)
    return MoEConfig(**fields)


def _state(source: Union[nn.Module, Mapping[str, torch.Tensor]], prefix: str) -> Dict[str, torch.Tensor]:
    items = source.state_dict().items() if isinstance(source, nn.Module) else source.items()
    return {k[len(prefix):]: v for k, v in items if k.startswith(prefix)}


def _take(state: Mapping[str, torch.Tensor], key: str, shape, prefix: str, rows: Optional[slice] = None,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`state[key]` checked against `shape`, then `[rows]` (experts: this rank's only), then,
    where the checkpoint holds it in FP8 with block scales, dequantized in at least fp32."""
    if key not in state:
        raise ValueError(f"ep.hf: {prefix}{key} is missing")
    t = state[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"ep.hf: {prefix}{key} has shape {tuple(t.shape)}, the layer needs {tuple(shape)}")
    t = t.detach()
    scale = state.get(key + SCALE_INV)
    if rows is not None:
        t = t[rows]
        scale = None if scale is None else scale[rows]
    if scale is None:
        if t.dtype == FP8:
            raise ValueError(f"ep.hf: {prefix}{key} is {FP8} without its block scales {prefix}{key}{SCALE_INV}")
        return t
    return _dequantized(t, scale.detach(), torch.promote_types(dtype or torch.float32, torch.float32), prefix + key)


def _block_sides(q_shape, scale_shape, name: str):
    """The block's (rows, columns) for a quantized `[..., R, C]` and its scales `[..., Rb, Cb]`:
    128 where the grid is ceil(R/128) (edge blocks partial), else R/Rb where that divides
    (transformers keeps two scale rows for a fused gate_up narrower than 128: one per half)."""
    sides = []
    for n, nb in zip(q_shape[-2:], scale_shape[-2:]):
        if nb == -(-n // BLOCK):
            sides.append(BLOCK)
        elif nb and n % nb == 0:
            sides.append(n // nb)
        else:
            raise ValueError(f"ep.hf: {name}: scales {tuple(scale_shape)} do not tile a weight of shape "
                             f"{tuple(q_shape)} in blocks of {BLOCK}")
    return sides


def _dequantized(q: torch.Tensor, scale: torch.Tensor, acc: torch.dtype, name: str) -> torch.Tensor:
    """`q * scale_inv` per block, in `acc` (float64 exact; fp32 rounds the product once)."""
    if q.dtype != FP8:
        raise ValueError(f"ep.hf: {name} has block scales but is {q.dtype}, not {FP8}")
    if scale.dim() != q.dim() or tuple(scale.shape[:-2]) != tuple(q.shape[:-2]):
        raise ValueError(f"ep.hf: {name}{SCALE_INV} has shape {tuple(scale.shape)} for a weight of {tuple(q.shape)}")
    br, bc = _block_sides(q.shape, scale.shape, name)
    return q.to(acc) * expand_blocks(scale.to(acc), q.shape[-2], q.shape[-1], br, bc)


@torch.no_grad()
def load_block(layer: ExpertParallelMoE, source: Union[nn.Module, Mapping[str, torch.Tensor]], prefix: str = "") -> None:
    """Copy a `transformers` MoE block's weights into `layer` (every rank, no communication).

    Args:
        layer: built with `moe_config(...)` of the same model (checked by shape).
        source: the block, or a state dict holding its tensors under `prefix`
            (e.g. `model.state_dict()` and `"model.layers.3.mlp."`); only this rank's
            experts are read from the expert tensors. A tensor stored in FP8 with its
            `_scale_inv` block scales (transformers' fine-grained FP8) is dequantized
            (this rank's experts only), in at least fp32, then cast to the layer's dtype.
    Raises:
        ValueError: naming the tensor that is missing or has the wrong shape, or the shared
            experts that one side has and the other has not.
    """
    cfg, r, El = layer.config, layer.rank, layer.num_local_experts
    H, F, E = cfg.hidden, cfg.ffn_hidden, cfg.num_experts
    state = _state(source, prefix)
    dt = layer.experts.w1.dtype
    layer.router.weight.copy_(_take(state, ROUTER, (E, H), prefix, dtype=dt))
    bias = state.get(BIAS)
    layer.router.e_score_correction_bias.copy_(_take(state, BIAS, (E,), prefix) if bias is not None else 0.0)
    mine = slice(r * El, (r + 1) * El)
    layer.experts.w1.copy_(_take(state, GATE_UP, (E, 2 * F, H), prefix, mine, dt).transpose(1, 2))
    layer.experts.w2.copy_(_take(state, DOWN, (E, H, F), prefix, mine, dt).transpose(1, 2))
    shared = layer.shared_experts
    if (shared is None) != (SHARED_GATE not in state):
        raise ValueError(f"ep.hf: the block {'has' if shared is None else 'has no'} shared experts "
                         f"({prefix}{SHARED_GATE}), the layer {'has none' if shared is None else 'has'} "
                         f"(MoEConfig.num_shared_experts={cfg.num_shared_experts})")
    if shared is not None:
        Fs = shared.w2.shape[0]
        shared.w1[:, :Fs].copy_(_take(state, SHARED_GATE, (Fs, H), prefix, dtype=dt).T)
        shared.w1[:, Fs:].copy_(_take(state, SHARED_UP, (Fs, H), prefix, dtype=dt).T)
        shared.w2.copy_(_take(state, SHARED_DOWN, (H, Fs), prefix, dtype=dt).T)


@torch.no_grad()
def load_fp8_experts(layer: ExpertParallelMoE, source: Union[nn.Module, Mapping[str, torch.Tensor]],
                     prefix: str = "") -> Fp8Experts:
    """This rank's routed experts of an FP8 block, kept in FP8, in the layer's layout (every
    rank, no communication; the layer's parameters are not touched).

    From `experts.gate_up_proj [E, 2F, H]` and `experts.down_proj [E, H, F]` (e4m3) with their
    `_scale_inv` block scales: `w1.q [E_local, H, 2F]` (gate columns then up, as `experts.w1`)
    with `w1.scale [E_local, H/128, 2F/128]`, and `w2.q [E_local, F, H]` with
    `w2.scale [E_local, F/128, H/128]`: the block's tensors transposed, blocks and all (a
    128x128 block of `[out, in]` is one of `[in, out]`), contiguous, float32 scales, on the
    layer's device.

    Raises:
        ValueError: a tensor missing, of the wrong shape or not FP8; H or F not a multiple of
            128 (then gate and up share blocks: load the dequantized weights with `load_block`).
    """
    cfg, r, El = layer.config, layer.rank, layer.num_local_experts
    H, F, E = cfg.hidden, cfg.ffn_hidden, cfg.num_experts
    if H % BLOCK or F % BLOCK:
        raise ValueError(f"ep.hf: FP8 experts in the layer's layout need hidden ({H}) and ffn_hidden ({F}) "
                         f"multiples of {BLOCK}")
    state = _state(source, prefix)
    mine = slice(r * El, (r + 1) * El)
    device = layer.experts.w1.device
    parts = []
    for key, shape in ((GATE_UP, (E, 2 * F, H)), (DOWN, (E, H, F))):
        q = _take_raw(state, key, shape, prefix)
        if q.dtype != FP8:
            raise ValueError(f"ep.hf: {prefix}{key} is {q.dtype}, not {FP8}")
        grid = (E, shape[1] // BLOCK, shape[2] // BLOCK)
        scale = _take_raw(state, key + SCALE_INV, grid, prefix)
        parts.append(Fp8Weight(q=q[mine].transpose(1, 2).contiguous().to(device),
                                    scale=scale[mine].float().transpose(1, 2).contiguous().to(device)))
    return Fp8Experts(w1=parts[0], w2=parts[1])


def _take_raw(state: Mapping[str, torch.Tensor], key: str, shape, prefix: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"ep.hf: {prefix}{key} is missing")
    t = state[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"ep.hf: {prefix}{key} has shape {tuple(t.shape)}, FP8 experts in the layer's layout "
                         f"need {tuple(shape)}")
    return t.detach()


@torch.no_grad()
def block_state_dict(layer: ExpertParallelMoE, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """Collective (every rank calls it): the layer's weights in the block's layout on rank
    `dst` (the group's rank), with every rank's experts; None on the other ranks.

    The router and shared experts are rank `dst`'s (replicated: the same everywhere after
    the first forward). Tensors are in the parameters' dtype, on `dst`'s device; the bias
    is float32.
    """
    n, me = layer.world_size, layer.rank
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    El = layer.num_local_experts
    gathered = []
    for w in (w1, w2):
        rows = w.reshape(El, -1).contiguous()
        out = rows.new_empty(n * El if me == dst else 0, rows.shape[1])
        send = [El if r == dst else 0 for r in range(n)]
        recv = [El] * n if me == dst else [0] * n
        layer.transport.all_to_all(out, rows, recv, send, f"checkpoint: experts to rank {dst}").wait()
        gathered.append(out)
    if me != dst:
        return None
    w1_all = gathered[0].view(n * El, *w1.shape[1:])
    w2_all = gathered[1].view(n * El, *w2.shape[1:])
    state = {
        ROUTER: layer.router.weight.detach().clone(),
        BIAS: layer.router.e_score_correction_bias.clone(),
        GATE_UP: w1_all.transpose(1, 2).contiguous(),
        DOWN: w2_all.transpose(1, 2).contiguous(),
    }
    if layer.shared_experts is not None:
        s1, s2 = layer.shared_experts.w1.detach(), layer.shared_experts.w2.detach()
        Fs = s2.shape[0]
        state.update({SHARED_GATE: s1[:, :Fs].T.contiguous(), SHARED_UP: s1[:, Fs:].T.contiguous(),
                      SHARED_DOWN: s2.T.contiguous()})
    return state


def save_block(layer: ExpertParallelMoE, block: Optional[nn.Module], dst: int = 0) -> None:
    """Collective: write the layer's weights into the `transformers` block on rank `dst`
    (`block` may be None elsewhere). A block without a selection bias (Mixtral, Qwen3-MoE)
    takes none; the layer's must then be zero."""
    state = block_state_dict(layer, dst)
    if state is None:
        return
    own = block.state_dict()
    if BIAS not in own and torch.count_nonzero(state.pop(BIAS)):
        raise ValueError("ep.hf: the layer's router has a non-zero selection bias; the block has none")
    missing, unexpected = sorted(set(own) - set(state) - {HASH_TABLE}), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"ep.hf: the layer has nothing for the block's {missing}; the block has no {unexpected}")
    block.load_state_dict(state, strict=False)


class ExpertParallelBlock(nn.Module):
    """The layer in place of a `transformers` MoE block: `forward(hidden_states [..., H],
    input_ids=None)` as the block's. With a hash table (DeepSeek-V4's `hash_moe` layers,
    `tid2eid [vocab, k]`), token id t goes to experts `tid2eid[t]`, weighed by the router
    (`layer.router.weigh`): routing given by the caller, as the contract has it.
    """

    def __init__(self, layer: ExpertParallelMoE, tid2eid: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.moe = layer
        self.register_buffer("tid2eid", tid2eid)

    def forward(self, hidden_states: torch.Tensor, input_ids: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        if self.tid2eid is None:
            return self.moe(hidden_states)
        if input_ids is None:
            raise ValueError("ep.hf: a hash-routed block needs input_ids")
        router = self.moe.router
        self.moe.sync_replicas()  # the router is used before the layer: make it rank 0's first
        x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        idx_TK = self.tid2eid[input_ids.reshape(-1)].long()
        return self.moe(hidden_states, topk_idx=idx_TK, topk_weights=router.weigh(router.scores(x_TH), idx_TK))


def replace_moe_blocks(model: nn.Module, group=None, **overrides) -> int:
    """Replace every MoE block of a `transformers` model (a module with `gate` and `experts`)
    by an `ExpertParallelBlock` over `group` (a process group, a 1-D `DeviceMesh` such as
    `mesh["ep"]`, or None), its weights loaded (`load_block`) on every rank.

    Returns:
        how many blocks were replaced.
    """
    group = as_process_group(group, "replace_moe_blocks(group=...)")
    cfg = moe_config(model.config, **overrides)
    targets = [(name, m) for name, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    for name, block in targets:
        layer = ExpertParallelMoE(cfg, group)
        experts = block.experts.gate_up_proj
        dtype = block.gate.weight.dtype if experts.dtype == FP8 else experts.dtype  # FP8 blocks: the router's
        with torch.no_grad():
            layer.to(dtype=dtype, device=experts.device)
        load_block(layer, block)
        table = getattr(block.gate, "tid2eid", None)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                ExpertParallelBlock(layer, None if table is None else table.clone()))
    return len(targets)
