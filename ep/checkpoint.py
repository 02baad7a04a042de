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
another mesh dimension) shards them like any parameter. Under FSDP2 the experts already are
DTensors over the data-parallel mesh, which says nothing about the EP shards: `state_dict()`
then raises (DCP would keep one EP rank's experts and drop the rest); see the README.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

EXPERT_KEYS = ("experts.w1", "experts.w2")
_MESHES: Dict[Tuple[str, str], Any] = {}  # (group name, device type) -> the 1-D DeviceMesh of the EP group


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


def experts_as_dtensors(layer, state_dict: Dict[str, Any], prefix: str, local_metadata) -> None:
    """`state_dict` post-hook: the experts as DTensors `[E, ...]`, `Shard(0)` over the EP mesh."""
    mesh = ep_mesh(layer)
    if mesh is None:
        return
    DTensor, Shard = _dtensor_api()
    for key in EXPERT_KEYS:
        name = prefix + key
        local = state_dict.get(name)
        if local is None:
            continue
        if isinstance(local, DTensor):
            raise NotImplementedError(
                f"ep: {name} is already a DTensor (on mesh {local.device_mesh}, placements {local.placements}), "
                f"e.g. sharded by FSDP2 over data-parallel ranks: its placements do not record the expert-parallel "
                f"shards, so a distributed checkpoint would keep one EP rank's experts; save and load the layer's "
                f"state dict outside FSDP2 (see the README, 'FSDP2 and distributed checkpoints')")
        whole = _whole_shape(layer, local)
        stride = torch.empty(whole, device="meta").stride()
        state_dict[name] = DTensor.from_local(local.detach(), mesh, [Shard(0)], run_check=False,
                                              shape=whole, stride=stride)


def _rows_of_rank(layer, name: str, value: Any) -> torch.Tensor:
    """This rank's `[E_local, ...]` rows of a state dict's expert tensor (see the module doc)."""
    DTensor, Shard = _dtensor_api()
    param = layer.experts.w1 if name.endswith("w1") else layer.experts.w2
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
        mesh = ep_mesh(layer)
        same_ranks = mesh is not None and value.device_mesh.ndim == 1 and \
            value.device_mesh.mesh.tolist() == mesh.mesh.tolist()
        if same_ranks and tuple(value.placements) == (Shard(0),):
            return value.to_local()
        value = value.full_tensor()  # collective over the DTensor's mesh
    if value.shape[0] == E:
        return value[r * El:(r + 1) * El]
    return value


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
