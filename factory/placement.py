"""Which waiting parts start now, and on which GPUs: pure decisions.

A part starts when its need (factory.resources.Need) fits beside what the
running parts hold: CPU slots, RAM and whole GPUs are counted against the
node's resources; disk only against other running parts (alone, a part
starts as it always did, and a full disk mid-stage waits for room). A
`whole_node` part runs alone.

Parts are considered in the line's claim order. The first one that does
not fit is the *head*: later, smaller parts may start ahead of it at most
`[daemon] max_overtakes` times; after that nothing starts until the head
has. So the head starts after at most max_overtakes + (parts running when
it began to wait) completions, however many small parts keep arriving.
"""

from __future__ import annotations

from dataclasses import dataclass

from factory.resources import Need, NodeResources


@dataclass(frozen=True)
class Held:
    """What one running part holds."""

    base: str
    need: Need
    gpus: tuple[int, ...]


def fit(need: Need, node: NodeResources, held: list[Held], *, disk_free: int | None) -> tuple[int, ...] | None:
    """The GPUs (CUDA indices) `need` gets if it can start now beside
    `held`, else None. `disk_free`: free bytes on the hot tier, None when
    unknown (then disk does not constrain)."""
    if not held:
        return tuple(g.index for g in node.gpus) if need.whole_node else _gpus(need, node, held)
    if need.whole_node or any(h.need.whole_node for h in held) or len(held) >= node.max_parallel_parts:
        return None
    if sum(h.need.cpu_slots for h in held) + need.cpu_slots > node.cpu_slots:
        return None
    if sum(h.need.ram_bytes for h in held) + need.ram_bytes > node.ram_bytes:
        return None
    if disk_free is not None and sum(h.need.disk_bytes for h in held) + need.disk_bytes > disk_free:
        return None
    return _gpus(need, node, held)


def _gpus(need: Need, node: NodeResources, held: list[Held]) -> tuple[int, ...] | None:
    taken = {i for h in held for i in h.gpus}
    free = [g.index for g in node.gpus if g.index not in taken]
    return tuple(free[:need.gpus]) if need.gpus <= len(free) else None


class HeadReservation:
    """Keeps the part at the head of the queue from being starved (the rule
    in this module's docstring). One per worker; a restart starts afresh."""

    def __init__(self, max_overtakes: int) -> None:
        self.max_overtakes = max_overtakes
        self.head: str | None = None
        self.overtakes = 0

    def begin_scan(self) -> None:
        self._seen_head = False

    def blocked(self, base: str) -> None:
        """`base` did not fit: it is the head unless one was already met in this scan."""
        if self._seen_head:
            return
        self._seen_head = True
        if base != self.head:
            self.head, self.overtakes = base, 0

    def may_start(self, base: str) -> bool:
        """May `base`, which fits, start now? (Counts the overtake.)"""
        if base == self.head:
            self.head, self.overtakes = None, 0
            return True
        if not self._seen_head:
            return True
        if self.overtakes >= self.max_overtakes:
            return False
        self.overtakes += 1
        return True

    def end_scan(self) -> None:
        if not self._seen_head:  # nothing waited for room: no head
            self.head, self.overtakes = None, 0
