"""ep: a wave-pipelined expert-parallel Mixture-of-Experts runtime.

Letters used in names (`x_TH`, `topk_idx_TK`, `counts_NE`):
    T tokens on this rank, H hidden, F expert hidden (ffn), E experts in all,
    E_local = E / n experts per rank, k top-k, W waves, n ranks,
    N rows of a wave's regions (n x capacity), M a wave's candidate rows at the owner, I
    items (rows of expert math: received rows expanded to their local experts), C columns
    of a route table.

The plan's nouns, once:
    slot     one of a token's k (expert, weight) choices; with its token, an item's source.
    wave map which wave each (token, slot) is in (`ep.plan.WaveMap`): token waves (default)
             make wave w the w-th chunk of every rank's tokens (token t of T is in wave
             t * W // T); expert waves the w-th group of each rank's local experts (local
             expert e is in wave e * W // E_local).
    route    one row on the wire: a token sent to one rank in one wave with the slots it
             serves there (with dedup across expert waves: once per rank, in its first wave).
    touch    a (token, rank, wave) with items: its sum over them comes back in that wave's
             combine (a route is its touch, except with dedup across expert waves).
    row      a route's hidden vector as sent, with its slot table and the sender's status
             (`ep.layout`).
    region   the rows one rank sends another in one wave, `capacity` of them, a bound known
             before the call; a route's row is its place in its region.
    item     a received (row, slot) pair served in a wave: one row of expert math, in expert
             order; an anchor is the zero item that opens each expert's group.
    candidate rows  the received rows a wave's items may come from (its own; with dedup
             every wave's so far).
"""
from .config import MoEConfig
from .dist import init_distributed
from .layer import ExpertParallelMoE
from .plan import WaveMap, WavePlan, sender_plan

__all__ = ["MoEConfig", "ExpertParallelMoE", "WaveMap", "WavePlan", "sender_plan", "init_distributed"]
