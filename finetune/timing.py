"""Timing that holds on a shared machine, and the machine a number came from.

    side_by_side({"fp32": f, "int8": g}, repeats=5)   -> {"fp32": [s, s, ...], "int8": [...]}

The callables take turns in every repeat, so a neighbour's load hits all of them alike: compare the
ratios of one call, never numbers from two runs. Callers pick the statistic (the median for a
throughput users will see, the minimum for the cost of the code itself, timeit's reasoning).
`machine()` names the CPU, its ISA features and the threads, for every number written down.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "f16c", "fma")


def side_by_side(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` times, the fns interleaved round-robin after `warmup` calls each."""
    for fn in fns.values():  # first calls allocate and pack
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    """Cores this process may run on (its affinity), not cores present."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict:
    """The machine a measurement came from: CPU model, the ISA features that decide kernels, cores, load."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": available_cores(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
