"""How many threads the kernels use, and how idle ones wait.

`configure()` runs from `hybrid/__init__.py` before numba or torch is imported: numba reads
NUMBA_NUM_THREADS when it is imported, and OpenMP reads OMP_WAIT_POLICY when its library
is loaded. Anything already in the environment wins, so a user can still choose.

- Threads: the cores this process may run on (`os.sched_getaffinity`, which `taskset`,
  `docker --cpuset-cpus` and batch schedulers set), capped by the cgroup's CPU quota
  (`docker --cpus`, Kubernetes limits), rounded up. `os.cpu_count()`, numba's default,
  counts every core of the machine whatever the process may use.
- Waiting: a decode step is hundreds of short parallel regions. libgomp's default spins
  300,000 rounds after each, so the workers never sleep, and beside one busy process the
  built-in model decoded at 0.03-0.3x its idle speed. Sleeping at once (OMP_WAIT_POLICY=PASSIVE)
  is fair but pays a wake-up per region: in a VM, whose sleeping vCPU the host must wake,
  decode fell to 0.4x. SPIN_ROUNDS bridges the gaps inside a step and sleeps between steps
  and requests (docs/performance.md, "Contention", has the measurements).
"""

from __future__ import annotations

import math
import os

# libgomp's spin rounds before an idle worker sleeps (GOMP_SPINCOUNT). The built-in model,
# 2 threads, decode alone / beside one busy process, tok/s: 300 rounds 57 / 67 (as PASSIVE),
# 1,000 rounds 131-155 / 58-61, 3,000 146 / 44, endless spinning 151-166 / 30-54.
SPIN_ROUNDS = 1000

# cgroup v2 and v1 files holding the CPU quota of the process's cgroup.
CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(v2: str = CGROUP_V2, v1: tuple[str, str] = CGROUP_V1) -> float | None:
    """CPUs the cgroup quota allows (quota / period), or None when there is no limit."""
    try:
        with open(v2) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(v1[0]) as f:
            quota = int(f.read())
        with open(v1[1]) as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """Kernel threads by default: the cores this process may use, within its CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def configure() -> None:
    """Set the thread count and wait policy in the environment, unless already set there.

    Call before numba and torch are imported (a library loaded earlier keeps what it read)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(default_threads()))
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_ROUNDS)
