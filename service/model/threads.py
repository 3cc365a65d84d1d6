"""The model thread, and the rule that only it runs torch's intra-op threads.

OpenMP gives every thread that opens a parallel region a team of its own. Once libgomp manages more threads than
the process has CPUs, its idle workers stop spinning between regions and sleep, so each of the model's hundreds of
small parallel regions a step waits for a futex wake-up. Measured on 2 cores: a decode loop run on a second thread,
after the main thread had opened a team, fell from about 1,000 to 770 tok/s. So the model thread gets the threads
and every other thread, now or later (the event loop, ``asyncio.to_thread`` workers), runs torch on one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch


@cache
def default_threads() -> int:
    """torch's own choice for this machine (its physical cores), read once before anything lowers it."""
    return torch.get_num_threads()


def start_model_thread(threads: int | None = None) -> ThreadPoolExecutor:
    """A one-thread executor whose thread runs torch with ``threads`` intra-op threads (default: torch's choice);
    from the call on, every other thread runs torch single-threaded."""
    count = threads or default_threads()
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(count,)
    )
    executor.submit(torch.get_num_threads).result()  # the initializer has run on the model thread
    # torch keeps a per-thread count (OpenMP's and MKL's) and seeds new threads from the last value set: setting
    # one here lowers the calling thread and all threads started later, and leaves the model thread at ``count``.
    torch.set_num_threads(1)
    return executor
