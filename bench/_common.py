"""Shared bits of the benchmark scripts: timing and a machine fingerprint for the README."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    engine = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} "
            f"{platform.release()}, Docker {engine}")


def summary(values: list[float], unit: str = "s") -> str:
    """Median, min and max; `unit` "" for counts (connections), which are no seconds."""
    values = sorted(values)
    if not values:  # e.g. no round's rollback drained (bench_drain.round_drain)
        return "none (n=0)"
    if not unit:
        return (f"median {statistics.median(values):g}, min {values[0]:g}, "
                f"max {values[-1]:g} (n={len(values)})")
    return (f"median {statistics.median(values):.2f}{unit}, min {values[0]:.2f}{unit}, "
            f"max {values[-1]:.2f}{unit} (n={len(values)})")
