"""runbook/disk.py: which filesystems a run could not write to, judged from statvfs figures
(the real thing for a full or read-only disk is tests/test_disk_full.py)."""

from __future__ import annotations

from pathlib import Path

from runbook import disk
from runbook.disk import Space

MIB = 1 << 20


def test_one_problem_per_filesystem_named_by_its_first_directory() -> None:
    found = [Space(Path("/var/lib/togather"), 1, 10, False, 1000),
             Space(Path("/var/lock"), 1, 10, False, 1000),
             Space(Path("/etc/caddy"), 2, 100 * MIB, False, 1000)]
    problems = disk.problems(found)
    assert len(problems) == 1
    problem, fix = problems[0]
    assert problem.startswith("0 KiB free where /var/lib/togather lives")
    assert "`df -h /var/lib/togather`" in fix


def test_read_only_wins_over_free_space() -> None:
    [(problem, fix)] = disk.problems([Space(Path("/srv"), 1, 100 * MIB, True, 1000)])
    assert problem.startswith("/srv is on a read-only filesystem")
    assert "remount it read-write" in fix


def test_inodes_count_only_where_the_filesystem_counts_them() -> None:
    [(problem, fix)] = disk.problems([Space(Path("/srv"), 1, 100 * MIB, False, 3)])
    assert problem.startswith("3 free inodes where /srv lives")
    assert "`df -i /srv`" in fix
    assert disk.problems([Space(Path("/srv"), 1, 100 * MIB, False, None)]) == []  # btrfs


def test_room_enough_is_no_problem_and_the_marks_are_inclusive() -> None:
    assert disk.problems([Space(Path("/srv"), 1, disk.LOW, False, disk.LOW_INODES)]) == []
    assert len(disk.problems([Space(Path("/srv"), 1, disk.LOW - 1, False, None)])) == 1


def test_a_directory_not_created_yet_counts_where_it_would_be(tmp_path: Path) -> None:
    room = disk.space(tmp_path / "not" / "yet")
    assert room is not None and room.directory == tmp_path / "not" / "yet"
    assert room.device == tmp_path.stat().st_dev
