"""vLLM's CPU worker, for a worker that was forked rather than spawned.

vLLM gives each CPU worker its OpenMP threads and cores through OMP_* variables set just before the worker
process starts, which OpenMP reads when it loads. A forked worker loaded OpenMP long before, in the `vlm`
stub, with one thread per core on every core: it would compete with the scheduler and the front end for the
cores vLLM keeps for them. This worker applies the same threads and cores itself.
"""

from __future__ import annotations

import os

import torch
from vllm.utils.ompmultiprocessing import OMPProcessManager
from vllm.v1.worker.cpu_worker import CPUWorker


class ForkedCPUWorker(CPUWorker):
    def init_device(self) -> None:
        omp = OMPProcessManager(self.vllm_config)
        if not omp.skip_setup:
            cpus = omp.cpu_lists[self.local_rank]
            os.sched_setaffinity(0, cpus)
            torch.set_num_threads(len(cpus))  # before CPUWorker.init_device, which makes it a no-op
        super().init_device()
