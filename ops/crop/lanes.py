"""Which unit of work each crop worker cuts next: a big cell's parts stay on one worker, in order.

Why: a cell with more buildings than a unit of work holds is cut into parts,
north to south, and consecutive parts share the band of raster blocks along
their seam. A worker that cuts part k and then part k+1 keeps those blocks
(``TileSet.continues``) and decodes them once. Handed out to whichever worker
was free, as a plain process pool does, consecutive parts landed on different
workers: a 2-worker crop of the benchmark partition decoded 7 % more blocks
than one worker, work that more workers add rather than share.

So each worker (a "lane") takes the next part of the cell it holds; when it
has none, the first waiting unit of a cell no lane holds; and when every
waiting unit belongs to a cell another lane holds (the end of a partition),
it splits that work: it takes the middle one of the waiting parts of the cell
with the most of them and goes on from there, leaving the owner the parts
before it. Each lane still cuts runs of consecutive parts, so a split costs
one seam. No lane ever waits while a unit is ready.
"""

from __future__ import annotations

from ops.crop.units import Unit, part_number


class Schedule:
    """Units of work waiting to be cut, handed to lanes (workers) by :meth:`pick`."""

    def __init__(self, lanes: int) -> None:
        self._waiting: list[Unit] = []  # in arrival order (biggest cells first, see crop_partition)
        self._next: list[tuple[str, int] | None] = [None] * lanes  # (cell, part) each lane would cut next

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, unit: Unit) -> None:
        self._waiting.append(unit)

    def _take(self, lane: int, k: int) -> Unit:
        unit = self._waiting.pop(k)
        self._next[lane] = (unit.cell_id, part_number(unit) + 1)
        return unit

    def pick(self, lane: int) -> Unit | None:
        """The unit lane ``lane`` should cut next (removed from the waiting ones); None if none waits."""
        if not self._waiting:
            return None
        # 1. the next part of the cell this lane holds
        for k, u in enumerate(self._waiting):
            if (u.cell_id, part_number(u)) == self._next[lane]:
                return self._take(lane, k)
        # 2. the first unit of a cell no lane holds
        held = {n[0] for i, n in enumerate(self._next) if n is not None and i != lane}
        for k, u in enumerate(self._waiting):
            if u.cell_id not in held:
                return self._take(lane, k)
        # 3. split the cell with the most waiting parts: its middle part, the owner keeping those before it
        parts: dict[str, list[int]] = {}
        for k, u in enumerate(self._waiting):
            parts.setdefault(u.cell_id, []).append(k)
        ks = max(parts.values(), key=len)
        ks.sort(key=lambda k: part_number(self._waiting[k]))
        return self._take(lane, ks[len(ks) // 2])
