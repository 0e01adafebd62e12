"""Independent numeric pieces of a statistic run side by side on the machine's cores, in threads; independent
whole analyses (one subject's collapse and probes, with their figures) in processes.

numpy's LAPACK and BLAS calls release the GIL, so the heavy parts of a statistic computed piece by piece (the
batched eigendecompositions of a refitted bootstrap, the ridge fits of the probe cells) run in parallel in
threads without copying their inputs. Each piece is computed on its own and the results come back in the order
of the items, so a result does not depend on the number of threads. BLAS is held to one thread meanwhile (many
small products, where BLAS's own threads only compete with ours).

Matplotlib and the Python around the products hold the GIL, so whole analyses, figures included, run side by
side only in processes (`map_in_processes`): spawned once per process and reused, each with the cores left per
process as its own thread count. Their results are those of the same function run here.

``LATENTPROBE_THREADS`` sets the number of threads, and of analysis processes (default: the cores this process
may use; 1 runs everything serially in this process).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from threadpoolctl import ThreadpoolController

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


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    # Finding the loaded BLAS and OpenMP libraries walks every shared library of the process: with torch loaded
    # that took 3 s of a demo's report when done per statistic. Found once; a BLAS loaded later keeps its own
    # thread count, which changes speed only, never a result.
    return ThreadpoolController()


def one_blas_thread() -> AbstractContextManager:
    """A context in which BLAS and OpenMP use one thread (many small products, where their own threads only
    compete with ours); the libraries are looked up once per process."""
    return _blas_controller().limit(limits=1)


def map_in_threads(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[function(item) for item in items]``, the items spread over `worker_count` threads, BLAS on one thread.

    >>> map_in_threads(lambda x: x * x, [1, 2, 3])
    [1, 4, 9]
    """
    items = list(items)
    workers = min(worker_count(), len(items))
    with one_blas_thread():
        if workers <= 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="latentprobe-stats") as pool:
            return list(pool.map(function, items))


def map_in_processes(function: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """``function(item)`` for each item, in order, from up to `worker_count` processes that start on every item at
    once, so the caller can do other work before it iterates; in this process, one item as each is asked for,
    when a single process would do. ``function`` and the items must pickle (a module-level function or a
    ``functools.partial`` of one). A worker that dies (out of memory, killed) is one clear error.

    >>> list(map_in_processes(abs, [-1, 2, -3]))
    [1, 2, 3]
    """
    items = list(items)
    workers = min(worker_count(), len(items))
    if workers <= 1:
        return (function(item) for item in items)
    futures = _submit(workers, [(function, (item,)) for item in items])

    def results() -> Iterator[R]:
        try:
            for future in futures:
                yield _result_of(future, workers)
        finally:
            for future in futures:
                future.cancel()  # the caller stopped early: work not yet started is dropped

    return results()


def start_in_process(function: Callable[[T], R], item: T, count: int) -> Callable[[], R]:
    """Start ``function(item)`` now in the processes `map_in_processes` uses for ``count`` items and return a call
    that waits for its result; when a single process would do, a call that computes it here when called.

    >>> start_in_process(abs, -4, count=3)()
    4
    """
    workers = min(worker_count(), count)
    if workers <= 1:
        return functools.partial(function, item)
    return functools.partial(_result_of, _submit(workers, [(function, (item,))])[0], workers)


def _result_of(future, workers: int):
    try:
        return future.result()
    except BrokenProcessPool:
        _POOLS.pop(_pool_key(workers), None)
        raise LatentProbeError("an analysis process died before it finished (out of memory, or killed)",
                               "run again with LATENTPROBE_THREADS=1 to analyse in this one process") from None


def start_processes(count: int, preload: Sequence[str] = ()) -> None:
    """Start now the processes `map_in_processes` will use for ``count`` items, each importing the ``preload``
    modules, so that their start (seconds of imports) overlaps the caller's other work; nothing when a single
    process would do."""
    workers = min(worker_count(), count)
    if workers > 1 and _pool_key(workers) not in _POOLS:
        _submit(workers, [(os.getpid, ())] * workers, preload=tuple(preload))  # a task each spawns every worker


# The pools of this process, by (workers, threads each): spawned once and reused (their start is seconds of
# imports); they end with the process.
_POOLS: dict[tuple[int, int], ProcessPoolExecutor] = {}


def _pool_key(workers: int) -> tuple[int, int]:
    return workers, max(1, worker_count() // workers)


def _submit(workers: int, calls: list, preload: tuple[str, ...] = ()) -> list:
    key = _pool_key(workers)
    try:
        return _submit_to(key, calls, preload)
    except BrokenProcessPool:  # a worker of the reused pool died earlier: start afresh, once
        _POOLS.pop(key, None)
        return _submit_to(key, calls, preload)


def _submit_to(key: tuple[int, int], calls: list, preload: tuple[str, ...]) -> list:
    if key not in _POOLS:
        # spawn, never fork: the parent may hold torch's and OpenMP's threads, which a forked child cannot use.
        _POOLS[key] = ProcessPoolExecutor(max_workers=key[0], mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_start_worker, initargs=(key[1], os.getpid(), preload))
    with _children_skip_main():  # a worker starts when a call finds none idle
        return [_POOLS[key].submit(function, *args) for function, args in calls]


@contextmanager
def _children_skip_main() -> Iterator[None]:
    """A spawned child first imports the parent's ``__main__`` again: a user's script without an
    ``if __name__ == "__main__":`` guard would run again in every worker (its study, its writes). Children started
    inside this context import this harmless module in its place (``multiprocessing.spawn`` reads the main
    module's ``__spec__``); the functions they run are looked up in their own modules."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = main.__dict__.get("__spec__")
    main.__spec__ = importlib.machinery.ModuleSpec(__name__, None)
    try:
        yield
    finally:
        main.__spec__ = saved


def _start_worker(threads: int, parent: int, preload: tuple[str, ...]) -> None:
    os.environ["LATENTPROBE_THREADS"] = str(threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # read by torch and the BLAS when they load, after this

    def leave_with_parent() -> None:
        # A killed parent (kill -9) must not leave analyses writing figures into a folder nobody owns.
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=leave_with_parent, name="latentprobe-parent-watch", daemon=True).start()
    for module in preload:
        importlib.import_module(module)
