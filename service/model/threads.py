"""The model thread, and the rule that only it runs torch's intra-op threads.

OpenMP gives every thread that opens a parallel region a team of its own. Once libgomp manages more threads than
the process has CPUs, its idle workers stop spinning between regions and sleep, so each of the model's hundreds of
small parallel regions a step waits for a futex wake-up. Measured on 2 cores: a decode loop run on a second thread,
after the main thread had opened a team, fell from about 1,000 to 770 tok/s. So the model thread gets the threads
and every other thread, now or later (the event loop, ``asyncio.to_thread`` workers), runs torch on one.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch

# How long a thread waiting for the GIL lets its holder run before asking for it (Python's default is 5 ms). A
# decode step takes the GIL back a few hundred times, between kernels that run without it; each time the event loop
# holds it (streaming a step's tokens to every client takes it for milliseconds), the model thread and the kernel
# team behind it wait up to this long. Server A/B at 16 and 64 streams, alternating, 0.5 ms against 5: ahead in 7
# of 10 rounds (mixed adapters at 16 streams 373/356/451/412 against 372/365/401/380 tok/s); a small edge on this
# noisy machine, but one the mechanism predicts.
GIL_SWITCH_INTERVAL_S = 0.0005


@cache
def default_threads() -> int:
    """torch's own choice for this machine (its physical cores), read once before anything lowers it."""
    return torch.get_num_threads()


def start_model_thread(threads: int | None = None) -> ThreadPoolExecutor:
    """A one-thread executor whose thread runs torch with ``threads`` intra-op threads (default: torch's choice);
    from the call on, every other thread runs torch single-threaded."""
    count = threads or default_threads()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(count,)
    )
    executor.submit(torch.get_num_threads).result()  # the initializer has run on the model thread
    # torch keeps a per-thread count (OpenMP's and MKL's) and seeds new threads from the last value set: setting
    # one here lowers the calling thread and all threads started later, and leaves the model thread at ``count``.
    torch.set_num_threads(1)
    return executor
