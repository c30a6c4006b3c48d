"""On a CPU host, vLLM's workers get cores of their own and the rest of the stack runs on the others.

vLLM's CPU worker binds its OpenMP threads to cores (VLLM_CPU_OMP_THREADS_BIND) and expects every other
process to stay off them: by itself it keeps one core for its front end. Ours is larger (tritonserver,
one process per model, the proxy), and where it floats onto a worker's core, that decode step waits for
it. So a CPU repository names the workers' cores (`EngineConfig.cpu_binding`, in vLLM's syntax), the
launcher starts tritonserver and the proxy on the other cores (`frontend_cpus`), and only the processes
vLLM starts may run on the workers' cores (`engine_processes_bound`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

# vLLM's own choices, which leave the placement to it: our processes then run anywhere.
UNBOUND = ("", "auto", "nobind")


def parse_binding(binding: str) -> list[list[int]]:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND syntax, one CPU list per tensor-parallel rank: "0-3|4,5,6,7"."""
    if binding in UNBOUND:
        return []
    ranks = []
    for rank in binding.split("|"):
        cpus: list[int] = []
        for part in rank.split(","):
            first, _, last = part.partition("-")
            cpus += range(int(first), int(last or first) + 1)
        ranks.append(cpus)
    return ranks


def bound_cpus(binding: str) -> set[int]:
    """Every CPU some rank of `binding` binds."""
    return {cpu for rank in parse_binding(binding) for cpu in rank}


def default_binding(allowed: Iterable[int], cores: int, tensor_parallel_size: int) -> str:
    """The first `cores` (half when 0) of the `allowed` CPUs, split among the ranks; "auto" (vLLM's own
    binding) when that leaves a rank no core or the rest of the stack none."""
    allowed = sorted(allowed)
    cores = cores or len(allowed) // 2
    if cores < tensor_parallel_size or cores >= len(allowed):
        return "auto"
    per_rank = cores // tensor_parallel_size
    return "|".join(",".join(map(str, allowed[rank * per_rank:(rank + 1) * per_rank]))
                    for rank in range(tensor_parallel_size))


def frontend_cpus(binding: str, allowed: Iterable[int]) -> set[int] | None:
    """The `allowed` CPUs the workers of `binding` leave to everything else; None: no placement."""
    bound = bound_cpus(binding)
    rest = set(allowed) - bound
    return rest if bound and rest else None


def _pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (a thread's affinity is its own; new threads inherit their creator's)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone
        return
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def engine_processes_bound(binding: str) -> Iterator[None]:
    """Around starting vLLM's engine in this thread: the processes it starts may run on `binding`'s cores
    too, so that its workers can bind there (OpenMP refuses cores outside a process's affinity) and its
    engine core runs wherever a core is free, as in vLLM's own server. This process's threads, those it
    started meanwhile included, keep its own CPUs."""
    bound = bound_cpus(binding)
    if not bound:
        yield
        return
    own = os.sched_getaffinity(0)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    os.sched_setaffinity(0, own | bound)
    try:
        yield
    finally:
        _pin_threads(os.getpid(), own)
