"""ep: a wave-pipelined expert-parallel Mixture-of-Experts runtime.

Letters used in names (`x_TH`, `topk_idx_TK`, `counts_NE`):
    T tokens on this rank, H hidden, F expert hidden (ffn), E experts in all,
    E_local = E / n experts per rank, k top-k, W waves, n ranks,
    S routes (rows) a rank sends in a wave, R rows it receives, N rows of a wave's regions
    (n x capacity), I items (rows of expert math: received rows expanded to their local
    experts).

The plan's nouns, once:
    slot     one of a token's k (expert, weight) choices.
    route    a token sent to one rank: one row on the wire, however many of its slots that
             rank serves; it comes back once, summed over them.
    row      a route's hidden vector as sent (token waves: with its slot table and the
             sender's status, `ep.layout`).
    wave     token waves (default): the w-th chunk of every rank's tokens (token t of T is
             in wave t * W // T); expert waves: the w-th group of each rank's local experts.
    region   token waves: the rows one rank sends another in one wave, `capacity` of them,
             a bound known before the call; a route's row is its place in its region.
    item     a received (row, slot) pair served here: one row of expert math, in expert
             order; an anchor is the zero item that opens each expert's group.
    touch    expert waves: a (wave, received row) pair whose items that wave sums.
    count table  expert waves: the routes, touches and items one rank sends another, with its
             T and status (`ep.count_table`); exchanged once per call, read on the host.
"""
from .config import MoEConfig
from .dist import init_distributed
from .layer import ExpertParallelMoE
from .plan import DispatchPlan
from .plan_exchange import make_plan

__all__ = ["MoEConfig", "ExpertParallelMoE", "DispatchPlan", "make_plan", "init_distributed"]
