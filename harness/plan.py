"""The plan of a run: which (sample, workload, mode, store) keys it measures, in which order,
and the deterministic part of it a shard (``lazybench run --shard K/N``) runs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from harness.cli import UserError
from harness.records import Key
from harness.scenario import Scenario


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1-based) of ``count`` parts of a run's plan (``--shard K/N``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with 1 ≤ K ≤ N; raises :class:`UserError` otherwise."""
        k, sep, n = text.partition("/")
        try:
            shard = cls(int(k), int(n))
        except ValueError:
            shard = None
        if not sep or shard is None or not 1 <= shard.index <= shard.count:
            raise UserError(f"--shard: expected K/N with 1 ≤ K ≤ N (e.g. 2/4), got {text!r}")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def plan(scenario: Scenario, shard: Shard | None = None) -> list[Key]:
    """Every (sample, workload, mode, store) key, each sample's keys shuffled with a seeded RNG
    (a lazy mode is measured once per store, inside the same shuffle). With ``shard`` the
    keys at plan positions ``index-1, index-1+count, …``: the shards of one plan are disjoint
    and together the whole plan, on any machine."""
    keys = [
        (w.name, m, st)
        for w in scenario.workloads
        for m in scenario.modes_of(w)
        for st in scenario.stores_of(m)
    ]
    out = []
    for sample in range(scenario.samples):
        order = keys[:]
        random.Random(f"{scenario.seed}:{sample}").shuffle(order)
        out += [Key(sample, w, m, st) for w, m, st in order]
    if shard is not None:
        out = out[shard.index - 1 :: shard.count]
    return out
