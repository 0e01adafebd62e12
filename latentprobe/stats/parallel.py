"""Independent numeric pieces of a statistic run side by side on the machine's cores, in threads.

numpy's LAPACK and BLAS calls release the GIL, so the heavy parts of a statistic computed piece by piece (the
batched eigendecompositions of a refitted bootstrap, the ridge fits of the probe cells) run in parallel in
threads without copying their inputs. Each piece is computed on its own and the results come back in the order
of the items, so a result does not depend on the number of threads. BLAS is held to one thread meanwhile (many
small products, where BLAS's own threads only compete with ours).

``LATENTPROBE_THREADS`` sets the number of threads (default: the cores this process may use; 1 runs
serially).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from threadpoolctl import threadpool_limits

from ..errors import LatentProbeError

T = TypeVar("T")
R = TypeVar("R")


def worker_count() -> int:
    """Threads for independent numeric pieces: ``LATENTPROBE_THREADS``, else the cores this process may use."""
    value = os.environ.get("LATENTPROBE_THREADS", "").strip()
    if value:
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise LatentProbeError(f"LATENTPROBE_THREADS={value!r} is not a whole number >= 1",
                                   "set it to the number of threads to use (1 runs serially) or unset it")
        return count
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_in_threads(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[function(item) for item in items]``, the items spread over `worker_count` threads, BLAS on one thread.

    >>> map_in_threads(lambda x: x * x, [1, 2, 3])
    [1, 4, 9]
    """
    items = list(items)
    workers = min(worker_count(), len(items))
    with threadpool_limits(limits=1):
        if workers <= 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="latentprobe-stats") as pool:
            return list(pool.map(function, items))
