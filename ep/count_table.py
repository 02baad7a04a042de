"""The one layout of the expert-wave plan's count table (`ep.plan`, `ep.plan_exchange`).

Each rank sends every rank one row of int64 counts; the plan's one host sync reads what it
sent and what it received. Row r of the table rank s sends is what rank r will receive
from s (with W waves and E_local experts per rank):

    [ routes out: W | routes back: W | touches: W | items: E_local | tokens: 1 | status: S ]

- routes out, per first wave: the routes s sends r in that wave's dispatch;
- routes back, per last wave: the rows r sends back to s in that wave's combine;
- touches, per wave: the (route, wave) pairs of those routes that the wave's experts serve;
- items, per local expert of r: the (token, slot) pairs of s that expert serves;
- tokens: s's token count T (the same in every row); the largest bounds every all-to-all;
- status: s's input checks (`ep.checks`' status slots; the same in every row), so a rank
  with bad input makes every rank raise in the same exchange.

`CountTable` names these columns for the writers (the plan's torch path and its Triton
kernel, `ep.kernels.triton_plan`) and the parser (`CountTable.parse`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .checks import STATUS_SLOTS

Counts = Tuple[Tuple[int, ...], ...]
"""`[W][n]` host ints: per wave, per rank."""


def per_rank(counts: Counts) -> List[int]:
    """`[W][n]` counts summed over waves -> `[n]`."""
    return [sum(col) for col in zip(*counts)]


@dataclass(frozen=True)
class PlanCounts:
    """The exchanged count tables as host ints: every size the rest of the plan needs."""

    send_counts: Counts
    """`[W][n]` routes this rank sends each rank in each wave's dispatch."""
    back_counts: Counts
    """`[W][n]` rows coming back from each rank in each wave's combine."""
    recv_counts: Counts
    """`[W][n]` rows received from each rank in each wave's dispatch."""
    return_counts: Counts
    """`[W][n]` rows this rank sends back to each rank in each wave's combine."""
    touch_counts: Tuple[int, ...]
    """`[W]` touches per wave here."""
    items_per_expert: Tuple[int, ...]
    """`[E_local]` items of each local expert."""
    max_tokens: int
    """The largest token count of any rank (the same on every rank)."""
    status_by_rank: Tuple[Tuple[int, ...], ...]
    """`[n][STATUS_SLOTS]` each rank's input checks (`ep.checks.raise_on_problems` reads them)."""

    @property
    def num_routes_sent(self) -> int:
        return sum(map(sum, self.send_counts))

    @property
    def num_rows_received(self) -> int:
        return sum(map(sum, self.recv_counts))


@dataclass(frozen=True)
class CountTable:
    """Where each group of columns of a count-table row lies (see the module docstring).

    Args:
        num_waves: W.
        num_local_experts: E_local.
    """

    num_waves: int
    num_local_experts: int

    @property
    def routes_out(self) -> slice:
        """`[W]` columns: routes out per first wave."""
        return slice(0, self.num_waves)

    @property
    def routes_back(self) -> slice:
        """`[W]` columns: routes back per last wave."""
        return slice(self.num_waves, 2 * self.num_waves)

    @property
    def touches(self) -> slice:
        """`[W]` columns: (route, wave) touches per wave."""
        return slice(2 * self.num_waves, 3 * self.num_waves)

    @property
    def items(self) -> slice:
        """`[E_local]` columns: items per local expert of the receiving rank."""
        return slice(3 * self.num_waves, 3 * self.num_waves + self.num_local_experts)

    @property
    def tokens(self) -> int:
        """The column of the sender's token count."""
        return self.items.stop

    @property
    def status(self) -> slice:
        """`[STATUS_SLOTS]` columns: the sender's status."""
        return slice(self.tokens + 1, self.tokens + 1 + STATUS_SLOTS)

    @property
    def width(self) -> int:
        """Columns of a row."""
        return self.status.stop

    def parse(self, sent: Sequence[Sequence[int]], received: Sequence[Sequence[int]]) -> PlanCounts:
        """The counts, from the host ints of the table this rank sent and the one it received.

        Args:
            sent: `[n][width]`, row r: what this rank sent rank r.
            received: `[n][width]`, row s: what rank s sent this rank.
        """
        def per_wave(rows, columns: slice) -> Counts:  # [n][W] -> [W][n]
            return tuple(zip(*(row[columns] for row in rows)))

        def summed(columns: slice) -> Tuple[int, ...]:  # over the ranks that sent them
            return tuple(map(sum, zip(*(row[columns] for row in received))))

        return PlanCounts(
            send_counts=per_wave(sent, self.routes_out),
            back_counts=per_wave(sent, self.routes_back),
            recv_counts=per_wave(received, self.routes_out),
            return_counts=per_wave(received, self.routes_back),
            touch_counts=summed(self.touches),
            items_per_expert=summed(self.items),
            max_tokens=max(row[self.tokens] for row in received),
            status_by_rank=tuple(tuple(row[self.status]) for row in received),
        )
