"""The layer's state dict for distributed checkpoints that reshard (`torch.distributed.checkpoint`).

A layer holds only its EP group's share of the experts (`experts.w1 [E_local, H, 2F]`,
`experts.w2 [E_local, F, H]`). In `layer.state_dict()` they appear as what they are, the
whole `[E, H, 2F]` and `[E, F, H]` tensors sharded on dim 0 over the EP group: DTensors with
`Shard(0)` on a `DeviceMesh` of the EP group's ranks (made from the group, no collective),
whose local tensors are the parameters themselves (no copy). `torch.distributed.checkpoint`
(DCP) saves every rank's rows at their global offsets and, at load, reads each rank's rows
from wherever they were saved: a checkpoint written at one EP size loads at another.
In a one-process world (no process group) the local experts are all E: plain tensors.

The router (`router.weight`, `router.e_score_correction_bias`) and the shared experts are
replicated: plain tensors, saved once by DCP and read whole by every rank.

`layer.load_state_dict(state)` takes, for each expert tensor, any of:
  - a DTensor of the whole shape (what `state_dict()` gives, at any EP size, after DCP
    loaded into it): this rank's rows, with no communication when it is sharded on dim 0
    over a mesh of this group's ranks (else `full_tensor()`, a collective over its mesh);
  - a plain tensor of the whole shape (`[E, H, 2F]`, e.g. a single-process model's): this
    rank's rows are taken;
  - a plain tensor of this rank's shape `[E_local, ...]` when E_local < E: this rank's own
    experts, as `state_dict()` gave them before it gave DTensors (a per-rank `torch.save`).
Any other shape raises `ValueError` naming the tensor, its shape and the layer's E (never
a silent drop of experts). `dcp.load` itself refuses a checkpoint whose experts have another
shape (a `CheckpointException` naming the tensor and both sizes); `ep.checkpoint.load(model,
path)` checks the checkpoint's metadata first and raises `ValueError` naming the layer and
both E.

The parameters stay plain tensors: the engine computes on them as before, and FSDP2 (over
another mesh dimension) shards them like any parameter. Under FSDP2 (`fully_shard(layer,
mesh=dp_mesh)`, a 1-D dp mesh) the experts are DTensors `[E_local, ...]`, `Shard(0)` over dp,
which alone says nothing of the EP shards (DCP would keep one EP rank's experts and drop the
rest). `state_dict()` then gives them as DTensors `[E, ...]` over a 2-D mesh `("ep", "dp")`
of the EP and dp groups with `(Shard(0), Shard(0))`: dim 0 split over ep, each EP rank's
share split again over dp, as FSDP2 splits it (`torch.chunk`); and `load_state_dict` turns
any accepted form back into FSDP2's dp shard. Other FSDP2 layouts (HSDP's 2-D dp mesh)
raise `NotImplementedError`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

EXPERT_KEYS = ("experts.w1", "experts.w2")
_MESHES: Dict[Tuple[str, ...], Any] = {}  # group names and device type -> the EP group's mesh (1-D, or ("ep", "dp"))


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def ep_group(layer) -> Optional[dist.ProcessGroup]:
    """The layer's EP process group, or None in a one-process world."""
    return getattr(layer.transport, "group", None)


def ep_mesh(layer):
    """The 1-D `DeviceMesh` of the layer's EP group (`DeviceMesh.from_group`: no collective),
    one per group and device type; None in a one-process world."""
    group = ep_group(layer)
    if group is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    device_type = layer.transport.device.type
    key = (group.group_name, device_type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, device_type)
    return _MESHES[key]


def _whole_shape(layer, local: torch.Tensor) -> torch.Size:
    return torch.Size((layer.config.num_experts, *local.shape[1:]))


def _dp_of(layer, param):
    """FSDP2's 1-D dp mesh of an expert parameter, or None when it is a plain tensor."""
    DTensor, Shard = _dtensor_api()
    if not isinstance(param, DTensor):
        return None
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(
            f"ep: the layer's experts are DTensors on mesh {mesh} with placements {param.placements}; "
            f"checkpoints support plain experts and FSDP2 over a 1-D dp mesh (Shard(0)) only")
    return mesh


def ep_dp_mesh(layer, dp_mesh):
    """The 2-D `("ep", "dp")` mesh of the layer's EP group and FSDP2's dp group (no collective).
    Rank (ep j, dp i) is `ep_ranks[j] + dp_ranks[i] - me`: the grid of `init_device_mesh`
    (and of any layout where the ranks are affine in the two indices); a mesh only needs
    this rank's own coordinates right (its row and column are the real groups), and a
    guess that cannot be a grid raises."""
    from torch.distributed.device_mesh import DeviceMesh

    ep_g, dp_g = ep_group(layer), dp_mesh.get_group(0)
    key = (ep_g.group_name, dp_g.group_name, dp_mesh.device_type)
    if key not in _MESHES:
        me = dist.get_rank()
        ep_ranks, dp_ranks = dist.get_process_group_ranks(ep_g), dist.get_process_group_ranks(dp_g)
        grid = [[p + d - me for d in dp_ranks] for p in ep_ranks]
        flat = sum(grid, [])
        if len(set(flat)) != len(flat) or not all(0 <= r < dist.get_world_size() for r in flat) or \
                set(ep_ranks) & set(dp_ranks) != {me}:
            raise NotImplementedError(f"ep: the EP group's ranks {ep_ranks} and the dp group's {dp_ranks} do not "
                                      f"form a grid of ranks (as init_device_mesh makes)")
        _MESHES[key] = DeviceMesh.from_group([ep_g, dp_g], dp_mesh.device_type, mesh=grid,
                                             mesh_dim_names=("ep", "dp"))
    return _MESHES[key]


def experts_as_dtensors(layer, state_dict: Dict[str, Any], prefix: str, local_metadata) -> None:
    """`state_dict` post-hook: the experts as DTensors `[E, ...]`, `Shard(0)` over the EP mesh
    (under FSDP2 over dp: `(Shard(0), Shard(0))` over the `("ep", "dp")` mesh)."""
    mesh = ep_mesh(layer)
    if mesh is None:
        return
    DTensor, Shard = _dtensor_api()
    for key in EXPERT_KEYS:
        name = prefix + key
        value = state_dict.get(name)
        if value is None:
            continue
        dp = _dp_of(layer, value)
        local, placements = (value, [Shard(0)]) if dp is None else (value.to_local(), [Shard(0), Shard(0)])
        whole = _whole_shape(layer, value)
        stride = torch.empty(whole, device="meta").stride()
        state_dict[name] = DTensor.from_local(local.detach(), mesh if dp is None else ep_dp_mesh(layer, dp),
                                              placements, run_check=False, shape=whole, stride=stride)


def _rows_of_rank(layer, name: str, value: Any) -> torch.Tensor:
    """This rank's `[E_local, ...]` rows of a state dict's expert tensor (see the module doc);
    under FSDP2, its dp shard of them as FSDP2's DTensor."""
    DTensor, Shard = _dtensor_api()
    param = layer.experts.w1 if name.endswith("w1") else layer.experts.w2
    dp = _dp_of(layer, param)
    El, E, n, r = layer.num_local_experts, layer.config.num_experts, layer.world_size, layer.rank
    whole = _whole_shape(layer, param)
    if tuple(value.shape) != tuple(whole) and not (
            not isinstance(value, DTensor) and El < E and tuple(value.shape) == tuple(param.shape)):
        got_e = value.shape[0] if value.dim() else "no"
        raise ValueError(
            f"ep: {name} in the state dict has shape {list(value.shape)} ({got_e} experts); this layer has "
            f"E={E} experts (MoEConfig.num_experts) and needs the whole {list(whole)}"
            + (f", or this rank's own {list(param.shape)} ({El} experts on each of {n} ranks)" if El < E else ""))
    if isinstance(value, DTensor):
        if dp is None:
            mine, placements = ep_mesh(layer), (Shard(0),)
        else:
            mine, placements = ep_dp_mesh(layer, dp), (Shard(0), Shard(0))
        if mine is not None and value.device_mesh.mesh.tolist() == mine.mesh.tolist() and \
                tuple(value.placements) == placements:
            local = value.to_local()
            return local if dp is None else _as_dp_shard(param, dp, local)
        value = value.full_tensor()  # collective over the DTensor's mesh
    rows = value[r * El:(r + 1) * El] if value.shape[0] == E else value
    if dp is None:
        return rows
    size = -(-rows.shape[0] // dp.size())  # FSDP2's (torch.chunk's) rows per dp rank; the last ones may have fewer
    i = dp.get_local_rank()
    return _as_dp_shard(param, dp, rows[i * size:(i + 1) * size])


def _as_dp_shard(param, dp_mesh, local: torch.Tensor):
    """`local` (this rank's dp shard of its EP rows) as FSDP2's DTensor, shaped as `param`."""
    DTensor, Shard = _dtensor_api()
    return DTensor.from_local(local, dp_mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride())


def experts_from_state_dict(layer, state_dict: Dict[str, Any], prefix: str, local_metadata, strict: bool,
                            missing_keys, unexpected_keys, error_msgs) -> None:
    """`load_state_dict` pre-hook: each expert tensor of `state_dict` becomes this rank's rows."""
    for key in EXPERT_KEYS:
        name = prefix + key
        if name in state_dict:
            state_dict[name] = _rows_of_rank(layer, name, state_dict[name])


def check_experts_fit(model: nn.Module, tensors_metadata: Dict[str, Any]) -> None:
    """Raise `ValueError` where a checkpoint's expert tensors (its metadata, `fqn -> .size`)
    do not have the shapes of `model`'s EP layers: a different E (named), or H, F."""
    from .layer import ExpertParallelMoE

    for name, layer in model.named_modules():
        if not isinstance(layer, ExpertParallelMoE):
            continue
        for key in EXPERT_KEYS:
            fqn = f"{name}.{key}" if name else key
            param = layer.experts.w1 if key.endswith("w1") else layer.experts.w2
            whole = list(_whole_shape(layer, param))
            saved = tensors_metadata.get(fqn)
            if saved is None:
                raise ValueError(f"ep: the checkpoint has no {fqn} (the experts of layer {name or 'model'!r})")
            size = list(getattr(saved, "size", ()))
            if size[:1] != whole[:1]:
                raise ValueError(f"ep: the checkpoint's {fqn} holds {size[0] if size else 'no'} experts ({size}); "
                                 f"layer {name or 'model'!r} has E={whole[0]} (MoEConfig.num_experts)")
            if size != whole:
                raise ValueError(f"ep: the checkpoint's {fqn} has shape {size}; layer {name or 'model'!r} needs "
                                 f"{whole} (E, then H and F of its MoEConfig)")


def load(model: nn.Module, checkpoint_id=None, *, storage_reader=None, **dcp_kwargs) -> None:
    """Collective: load a DCP checkpoint into `model` (any EP size, see the module doc):
    the checkpoint's experts are checked against every EP layer first (`check_experts_fit`),
    then `dcp.load(model.state_dict(), ...)` and `model.load_state_dict(...)`.
    `checkpoint_id`: a directory (or give a `storage_reader`); `dcp_kwargs` go to `dcp.load`."""
    import torch.distributed.checkpoint as dcp

    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(checkpoint_id)
    check_experts_fit(model, reader.read_metadata().state_dict_metadata)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=checkpoint_id, storage_reader=reader, **dcp_kwargs)
    model.load_state_dict(state)


def install(layer: nn.Module) -> None:
    """Register the two hooks on an `ExpertParallelMoE` (its `__init__` calls this)."""
    layer.register_state_dict_post_hook(experts_as_dtensors)
    layer.register_load_state_dict_pre_hook(experts_from_state_dict)
