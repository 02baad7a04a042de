"""ep: a wave-pipelined expert-parallel Mixture-of-Experts runtime.

Letters used in names (`x_TH`, `topk_idx_TK`, `counts_NE`):
    T tokens on this rank, H hidden, F expert hidden (ffn), E experts in all,
    E_local = E / n experts per rank, k top-k, W waves, n ranks,
    S routes (rows) a rank sends in a wave, R rows it receives, I items (rows of expert
    math: received rows expanded to their local experts).
"""
from .config import MoEConfig
from .dist import init_distributed
from .layer import ExpertParallelMoE
from .plan import DispatchPlan, make_plan

__all__ = ["MoEConfig", "ExpertParallelMoE", "DispatchPlan", "make_plan", "init_distributed"]
