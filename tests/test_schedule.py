"""How units of work are handed to crop workers: each exactly once, a big cell's parts in runs on one worker."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from ops.crop.lanes import Schedule
from ops.crop.units import part_number


@dataclass
class U:
    cell_id: str
    shard_id: str


def units(cells: dict[str, int]) -> list[U]:
    """Units in the order crop_partition queues them: cells biggest first, each cell's parts in order."""
    out = []
    for cell, n in sorted(cells.items(), key=lambda kv: -kv[1]):
        out += [U(cell, f"{cell}.p{k:03d}" if n > 1 else cell) for k in range(n)]
    return out


def run(todo: list[U], lanes: int, speed: list[int]) -> list[list[U]]:
    """What each lane cuts, lanes asking for work in turn; lane k asks ``speed[k]`` times per turn (is faster)."""
    s = Schedule(lanes)
    for u in todo:
        s.add(u)
    cut: list[list[U]] = [[] for _ in range(lanes)]
    for lane in itertools.cycle([k for k in range(lanes) for _ in range(speed[k])]):
        if not len(s):
            break
        u = s.pick(lane)
        assert u is not None, "a lane was refused work while units were waiting"
        cut[lane].append(u)
    assert s.pick(0) is None
    return cut


def breaks(seq: list[U]) -> int:
    """Units that do not continue the lane's previous unit (same cell, next part): each costs a seam."""
    return sum(
        1 for a, b in itertools.pairwise(seq) if not (a.cell_id == b.cell_id and part_number(b) == part_number(a) + 1)
    )


@pytest.mark.parametrize("speed", [[1, 1], [1, 2], [3, 1], [5, 1], [1, 1, 1]])
def test_every_unit_is_cut_once_and_a_cells_parts_stay_together(speed):
    cells = {"A": 8, "B": 7, "C": 6, "D": 4, "E": 1, "F": 1, "G": 1}
    todo = units(cells)
    cut = run(todo, len(speed), speed)
    handed = [u.shard_id for seq in cut for u in seq]
    assert sorted(handed) == sorted(u.shard_id for u in todo)  # each unit exactly once
    # runs of consecutive parts: one per cell, plus the splits that keep lanes busy at the end (about one a lane);
    # handed out in queue order instead, two equal lanes would cut 28 runs here
    runs = sum(1 + breaks(seq) for seq in cut if seq)
    assert runs <= len(cells) + len(speed)


def test_one_big_cell_is_split_once_between_two_lanes():
    cut = run(units({"A": 10}), 2, [1, 1])
    assert all(seq for seq in cut)  # both lanes work
    assert [breaks(seq) for seq in cut] == [0, 0]  # each cuts one run of consecutive parts: one seam in all
