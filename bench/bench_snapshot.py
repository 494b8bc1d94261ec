"""Benchmark: what the runbook's safety costs over the bare pipelines it replaces.

Starts its own drill stack, loads >= 1,000,000 rows into items, then times
  snapshot: runbook `snapshots.create` vs bare `docker exec pg_dump ... | gzip > file`
  restore:  runbook `snapshots.restore` (verify, safety snapshot, stop slots, one-transaction
            replay, verify counts) and its replay step alone vs bare
            `gunzip -c file | docker exec -i psql -X -v ON_ERROR_STOP=1 --single-transaction`
prints a table with medians and ratios, and tears the stack down.

    .venv/bin/python bench/bench_snapshot.py [--rows N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook import snapshot_restore, snapshots
from runbook.drill.stack import DrillStack


def describe_machine() -> str:
    try:
        from _common import machine  # bench/_common.py, shared by the benchmarks

        return machine()
    except Exception:
        return f"{os.cpu_count()} CPUs, {platform.platform()}"


def load_rows(stack: DrillStack, rows: int) -> None:
    with stack.connect() as conn:
        conn.execute(
            "INSERT INTO items (name, created_at) SELECT 'item ' || g || ' ' || md5(g::text), "
            "now() - g * interval '1 second' FROM generate_series(1, %s) g", (rows,))
        conn.execute("ANALYZE items")


def count(stack: DrillStack) -> int:
    with stack.connect() as conn:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def bare_dump(tgt: snapshots.Target, out: Path) -> None:
    """The contract's pipeline, as an operator would type it."""
    with open(out, "wb") as fh:
        dump = subprocess.Popen(snapshots.dump_command(tgt), stdout=subprocess.PIPE,
                                env=tgt.exec_env())
        gz = subprocess.run(["gzip"], stdin=dump.stdout, stdout=fh, check=True)
        assert dump.stdout is not None
        dump.stdout.close()
        if dump.wait() != 0 or gz.returncode != 0:
            raise SystemExit("bare pg_dump | gzip failed")


def bare_restore(tgt: snapshots.Target, path: Path) -> None:
    gunzip = subprocess.Popen(["gunzip", "-c", str(path)], stdout=subprocess.PIPE)
    psql = subprocess.run(snapshots.replay_command(tgt), stdin=gunzip.stdout,
                          stdout=subprocess.DEVNULL, env=tgt.exec_env(), check=False)
    assert gunzip.stdout is not None
    gunzip.stdout.close()
    if gunzip.wait() != 0 or psql.returncode != 0:
        raise SystemExit("bare gunzip | psql failed")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {k: [] for k in (
        "snapshot", "bare_dump", "restore", "replay_step", "bare_restore", "plan",
        "safety-snapshot", "stop-app-slots", "verify-restore")}
    with DrillStack() as stack:
        env = stack.env
        tgt = snapshots.target(env)
        began = time.perf_counter()
        load_rows(stack, args.rows)
        print(f"loaded {args.rows:,} rows in {time.perf_counter() - began:.1f}s", flush=True)
        bare_file = stack.run_dir / "bare.sql.gz"
        sizes: dict[str, int] = {}
        snap = None
        for i in range(args.repeat):
            seconds, snap = timed(lambda: snapshots.create(env, "bench"))
            results["snapshot"].append(seconds)
            seconds, _ = timed(lambda: bare_dump(tgt, bare_file))
            results["bare_dump"].append(seconds)
            print(f"round {i + 1}: snapshot {results['snapshot'][-1]:.2f}s, "
                  f"bare dump {seconds:.2f}s", flush=True)
        assert isinstance(snap, snapshots.Snapshot)
        sizes["runbook"] = snap.size_bytes
        sizes["bare"] = bare_file.stat().st_size
        for i in range(args.repeat):
            seconds, result = timed(lambda: snapshot_restore.restore(env, snap.path, restart=False))
            results["restore"].append(seconds)
            steps = {o.name: o.duration_ms / 1000 for o in result.outcomes}  # type: ignore[attr-defined]
            results["replay_step"].append(steps["restore-database"])
            for name in ("safety-snapshot", "stop-app-slots", "verify-restore"):
                results[name].append(steps[name])
            results["plan"].append(seconds - sum(steps.values()))
            assert count(stack) == args.rows
            seconds, _ = timed(lambda: bare_restore(tgt, bare_file))
            results["bare_restore"].append(seconds)
            assert count(stack) == args.rows
            print(f"round {i + 1}: restore {results['restore'][-1]:.2f}s (replay "
                  f"{results['replay_step'][-1]:.2f}s), bare restore {seconds:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    rows = [
        ("snapshot (create)", med["snapshot"], med["bare_dump"], "pg_dump | gzip"),
        ("restore, whole plan", med["restore"], med["bare_restore"], "gunzip | psql -1"),
        ("restore, replay step", med["replay_step"], med["bare_restore"], "gunzip | psql -1"),
    ]
    print()
    print(f"{args.rows:,} rows; median of {args.repeat}; {describe_machine()}")
    print(f"dump size: runbook {sizes['runbook'] / 1048576:.1f} MB, bare "
          f"{sizes['bare'] / 1048576:.1f} MB")
    print(f"{'operation':<22} {'runbook':>9} {'bare':>9} {'ratio':>7}  bare pipeline")
    for name, ours, bare, what in rows:
        print(f"{name:<22} {ours:>8.2f}s {bare:>8.2f}s {ours / bare:>6.2f}x  {what}")
    print("whole-plan restore, median per part: "
          + ", ".join(f"{name} {med[key]:.2f}s" for name, key in (
              ("lock+verify file+loss window", "plan"), ("safety snapshot", "safety-snapshot"),
              ("stop slots", "stop-app-slots"), ("replay", "replay_step"),
              ("verify counts", "verify-restore"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
