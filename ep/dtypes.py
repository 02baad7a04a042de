"""Dtype rules shared by the rooms."""
import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: fp32 under bf16/fp16/fp32, float64 under float64."""
    return torch.promote_types(dtype, torch.float32)
