"""CPU threads of torch, set for the machine and for the processes beside it.

Why: torch's CPU kernels run on GNU OpenMP (libgomp), whose threads by default *spin* at the end of every
parallel region, waiting for the other threads of the team. A stage that generates with a small model runs
tens of thousands of short parallel regions; when the cores are shared (other processes, the ephemeral
Prefect server, a second run), a spinning thread burns the time slice that the thread it waits for needs, and
each region then waits for the scheduler. Measured on 2 shared cores at load 6-10 (issue 21): one generate
stage of 64 prompts took 48-57 s with the default policy, 2.3-3.8 s with OMP_WAIT_POLICY=PASSIVE and 1.8-2.9 s
with one thread; at 256 prompts 148 s (plain loop) and 237 s (in a flow) against 7-10 s passive. The flow
and Prefect were not the cause: a plain loop collapsed alike.

So: `passive_openmp_wait()` (run when `alignment_core` is imported, before torch is: libgomp reads its
environment once, when torch loads it) makes waiting threads sleep unless the user chose a policy, and
`set_torch_threads()` gives each stage an explicit intra-op thread count in the thread that runs it (OpenMP's
thread count is per calling thread). Child processes (accelerate, vLLM) inherit the environment.
"""

import logging
import math
import os

logger = logging.getLogger(__name__)

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def passive_openmp_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless already set (the user's choice wins). Effective only if torch was not
    imported yet in this process; its children get it in every case."""
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


def usable_cpus(cgroup_cpu_max: str = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask (taskset, a container's cpuset), bounded by a cgroup v2
    CPU quota (`cpu.max` "quota period", e.g. a container limited to 1.5 CPUs: 2) where one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cgroup_cpu_max) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def torch_threads(configured: int | None) -> int | None:
    """The intra-op thread count a stage runs with: `configured` (model.torch_threads); unset, the usable CPUs,
    unless OMP_NUM_THREADS is set (torch already follows it: None, left as it is)."""
    if configured is not None:
        return configured
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return usable_cpus()


def set_torch_threads(configured: int | None) -> int:
    """Apply `torch_threads(configured)` in the calling thread (where the stage runs); returns the count torch
    now uses."""
    import torch

    threads = torch_threads(configured)
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
