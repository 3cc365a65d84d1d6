"""Only the model thread runs torch with several intra-op threads, and running the fused kernels there keeps it so
(a second OpenMP team in the process makes libgomp's idle workers sleep between regions: a quarter of decode
throughput on two cores)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from service.model.owned.kernels import cpu_kernels_available
from service.model.owned.ops import KernelOps
from service.model.threads import default_threads, start_model_thread


@pytest.fixture
def restore_threads() -> Iterator[None]:
    yield
    torch.set_num_threads(default_threads())


def _threads_on_a_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_the_model_thread_alone_keeps_several_threads(restore_threads: None) -> None:
    executor = start_model_thread(3)
    try:
        assert executor.submit(torch.get_num_threads).result() == 3
        assert torch.get_num_threads() == 1
        assert _threads_on_a_new_thread() == 1
    finally:
        executor.shutdown()


@pytest.mark.skipif(not cpu_kernels_available(), reason="no C++ compiler: the service runs torch ops instead")
def test_running_the_kernels_leaves_the_model_thread_its_threads(restore_threads: None) -> None:
    executor = start_model_thread(3)
    gate_up = torch.randn(256, 2 * 512)  # enough rows for every kernel to split its loop

    def run_kernels() -> int:
        ops = KernelOps()
        ops.silu_mul(gate_up)
        ops.add_norm(gate_up, None, torch.ones(gate_up.shape[1]), 1e-5)
        return torch.get_num_threads()

    try:
        assert executor.submit(run_kernels).result() == 3
    finally:
        executor.shutdown()
