"""runbook/disk.py: which filesystems a run could not write to, judged from statvfs figures
(the real thing for a full or read-only disk is tests/test_disk_full.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runbook import disk, files
from runbook.disk import Space
from runbook.errors import StateError
from runbook.snapshots import room

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


def test_the_snapshot_folder_needs_the_dumps_reserve_and_the_newest_snapshot() -> None:
    """What a restore's safety snapshot or a deploy's pre-deploy snapshot needs there: the
    5 % (at most 256 MiB) a dump keeps free, and about the newest snapshot's size."""
    folder = Space(Path("/var/lib/togather/db-snapshots"), 1, 0, False, 1000,
                   total=100 * MIB, dump_estimate=3 * MIB)
    assert folder.need == 5 * MIB + 3 * MIB
    enough = disk.problems([dataclasses.replace(folder, free=8 * MIB)])
    assert enough == []
    [(problem, fix)] = disk.problems([dataclasses.replace(folder, free=8 * MIB - 1)])
    assert problem.startswith("8191 KiB free where /var/lib/togather/db-snapshots lives: a "
                              "snapshot needs about 8192 KiB there"), problem
    assert "snapshot_dir" in fix and "`df -h /var/lib/togather/db-snapshots`" in fix
    big = Space(Path("/srv/snap"), 1, 300 * MIB, False, 1000, total=10_000 * MIB,
                dump_estimate=0)
    assert big.need == disk.RESERVE_MAX + disk.MIN_DUMP  # capped; a floor with no snapshot
    assert disk.problems([big]) == []


def test_a_snapshot_folder_is_named_once_per_filesystem() -> None:
    state = Space(Path("/var/lib/togather"), 1, 10, False, 1000)
    folder = Space(Path("/var/lib/togather/db-snapshots"), 1, 10, False, 1000,
                   total=100 * MIB, dump_estimate=MIB)
    [(problem, _)] = disk.problems([state, folder])  # that filesystem is named already
    assert problem.startswith("0 KiB free where /var/lib/togather lives"), problem
    # room for the runbook's own files, not for a snapshot: the folder is named
    roomy = dataclasses.replace(state, free=2 * MIB)
    [(problem, _)] = disk.problems([roomy, dataclasses.replace(folder, free=2 * MIB)])
    assert problem.startswith("2048 KiB free where /var/lib/togather/db-snapshots lives")


def test_the_estimate_is_the_largest_of_this_databases_last_snapshots(tmp_path: Path) -> None:
    """Found by review: the newest `togather_*.sql.gz` of any database was the estimate; the
    default folder is shared, and another database's bigger dump refused restores with room."""
    snaps = tmp_path / "snaps"
    assert room.dump_estimate(snaps, "db") == 0  # no folder yet
    snaps.mkdir()
    sizes = {"togather_db_20250101_000000_oldest.sql.gz": 9000,  # past the last RECENT
             "togather_db_20250102_000000_big.sql.gz": 3000,
             "togather_db_20250103_000000_small.sql.gz": 1000,
             "togather_db_20250104_000000_new.sql.gz": 2000,
             "togather_other_20250105_000000_new.sql.gz": 50_000,  # another database's
             "togather_db_staging_20250106_000000_new.sql.gz": 40_000,  # database db_staging
             ".togather_db_20250107_000000_x.sql.gz.0123abcd.partial": 90_000}
    for name, size in sizes.items():
        (snaps / name).write_bytes(b"x" * size)
    assert room.RECENT == 3
    assert room.dump_estimate(snaps, "db") == 3000
    assert room.dump_estimate(snaps, "db_staging") == 40_000
    assert room.dump_estimate(snaps, "nothing") == 0


# --- a symlink on the state file's path into a missing directory (an unmounted volume) ----


def test_a_symlink_into_a_missing_directory_is_named_with_the_first_missing_one(
        tmp_path: Path) -> None:
    mount_point = tmp_path / "volume"  # not mounted: an empty directory
    mount_point.mkdir()
    config = tmp_path / "config"
    config.mkdir()
    state = config / "deployment-state.json"
    state.symlink_to(mount_point / "togather" / "config" / "deployment-state.json")
    assert files.missing_link_target(state) == (state, mount_point / "togather")
    # a directory on the way that is the symlink (/opt/togather/src -> the volume)
    src = tmp_path / "src"
    src.symlink_to(mount_point / "src")
    assert files.missing_link_target(src / "deploy" / "state.json") == (src,
                                                                      mount_point / "src")


def test_no_symlink_or_its_directory_there_is_no_refusal(tmp_path: Path) -> None:
    # a host's first deploy: its directories are made
    assert files.missing_link_target(tmp_path / "not" / "yet" / "state.json") is None
    # a symlink to a file not written yet, in a directory that is there: written through it
    (tmp_path / "real").mkdir()
    link = tmp_path / "state.json"
    link.symlink_to(tmp_path / "real" / "state.json")
    assert files.missing_link_target(link) is None


def test_the_reader_names_a_dangling_symlink_and_its_target(tmp_path: Path) -> None:
    from runbook import state as states

    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    state = tmp_path / "deployment-state.json"
    state.symlink_to(mount_point / "togather" / "deployment-state.json")
    with pytest.raises(StateError) as refused:
        states.read_or_absent(state, environment="production")  # not a first deploy
    assert refused.value.message == (
        f"the state file {state} is not there: the symlink {state} points into "
        f"{mount_point / 'togather'}, which does not exist (an unmounted volume?)")
    with pytest.raises(StateError):
        states.write_state(state, states.absent(state, environment="production"))
    assert not (mount_point / "togather").exists()
    (mount_point / "togather").mkdir()  # mounted, the file not written yet: it says so
    with pytest.raises(StateError) as missing:
        states.read_state(state, environment="production")
    assert (f"it is a symlink to {mount_point / 'togather' / 'deployment-state.json'}, which "
            "does not exist") in missing.value.message


def test_nothing_to_say_where_this_user_may_write(tmp_path: Path) -> None:
    """The access checks judge the user running the runbook: nothing to say for a writable
    folder (as the tests' user); a real other user is tests/test_host_access.py's."""
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    assert disk.access_problems(env) == []
