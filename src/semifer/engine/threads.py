"""How many CPU threads torch should use: the CPUs this process may run on, minus busy ones.

torch's default is one thread per core of the machine. On a shared or containerised machine
that is wrong twice: the process may be allowed fewer CPUs (affinity mask, cgroup quota),
and with another busy process on one of two cores every parallel region waits for the
thread that is not scheduled (measured in docs/performance.md: 30 demo steps took 73 s with
the default beside one busy job, 2 s with one thread).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch


def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 cfs files); None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def allowed_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of the whole machine from /proc/stat, None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def busy_cpus(window_s: float = 0.3) -> int:
    """CPUs other processes keep busy now: machine-wide utilisation over ``window_s`` (this
    process sleeps meanwhile) times the CPU count, rounded; the 1-minute load average where
    /proc/stat is missing (it lags a started or stopped job by a minute)."""
    a = _cpu_times()
    if a is not None:
        time.sleep(window_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            util = 1.0 - (b[0] - a[0]) / (b[1] - a[1])
            return int(round(max(0.0, util) * (os.cpu_count() or 1)))
    try:
        return int(round(os.getloadavg()[0]))
    except (OSError, AttributeError):
        return 0


def choose_threads(requested: int = 0) -> tuple[int, str]:
    """(threads, why): ``requested`` if > 0, else the allowed CPUs not busy with other work (>= 1).

    ``OMP_NUM_THREADS`` set in the environment counts as a request (it is what a user or a
    job scheduler meant).
    """
    if requested > 0:
        return requested, "run.threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cpus, busy = allowed_cpus(), busy_cpus()
    n = max(1, min(cpus, cpus - busy))
    return n, f"{cpus} CPU(s) allowed, about {busy} busy with other processes"


def apply_threads(requested: int = 0, verbose: bool = True) -> int:
    """Set torch's intra-op threads from :func:`choose_threads`; returns the count."""
    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    if verbose:
        print(f"semifer: {n} CPU thread(s) ({why}; --threads N or run.threads to choose)")
    return n
