"""One thread count for every numeric library a job uses."""

from __future__ import annotations

import os
import sys


def limit_threads(threads: int) -> None:
    """Use at most ``threads`` threads in BLAS/OpenMP pools and in torch.

    Pools already loaded are limited now (threadpoolctl); torch is limited now if it is
    imported, else through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, which it reads when it is
    imported later (this does not import torch: most jobs never need it).
    """
    from threadpoolctl import threadpool_limits

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    threadpool_limits(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
