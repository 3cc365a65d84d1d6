"""The owned forward's CPU kernels (``csrc/``), compiled for this machine at first use: the fused step kernels
(``cpu_kernels.cpp``) and, for CPUs with AMX or AVX-512 BF16, bf16 matmuls (``packed_linear.cpp``).

They are built with the C++ compiler torch's extension loader finds, tuned for the CPU at hand (``-march=native``;
the build is cached per CPU feature set, so a cache shared between different machines never runs one machine's
build on another). Where no compiler is present, the build fails or the device is not a CPU, the forward runs the
same steps as torch ops instead (``ops.py``): slower, never different in what it computes; the matmuls then run
in oneDNN (``matmul.py``), whose sums may differ from the packed kernel's in the last bf16 bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name() -> str:
    """The extension's name: one per source and CPU feature set (torch caches builds by name)."""
    digest = hashlib.sha256()
    for path in sorted(_SOURCE_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(_cpu_features().encode())
    return f"adapter_service_kernels_{digest.hexdigest()[:12]}"


def _vector_flags() -> list[str]:
    """ATen's SIMD width for this CPU (what its own kernels pick at run time, chosen here at build time)."""
    flags = set(_cpu_features().split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def cpu_kernels_available() -> bool:
    """Whether ``torch.ops.adapter_service`` holds the kernels, building them on first call (once per process)."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _build()
        return _state["loaded"]


def packed_matmul_unit() -> str | None:
    """What runs the service's packed bf16 matmul here: "amx" (the CPU has AMX and the OS lets this process use
    it), "avx512_bf16", or None (the kernels did not build, or the CPU has neither: oneDNN's matmul is used)."""
    if not cpu_kernels_available():
        return None
    return str(torch.ops.adapter_service.packed_matmul_unit()) or None


def packed_matmul_available() -> bool:
    return packed_matmul_unit() is not None


@contextlib.contextmanager
def kernel_threads() -> Iterator[None]:
    """This thread's torch threads run the kernels' team alone; torch's own ops on it run on one thread meanwhile.

    For a step whose every matmul and fused op is a kernel: the kernels' team claims its parts with no barrier (a
    descheduled thread holds no one back, ``csrc/parallel.h``), but OpenMP's worker, woken by any torch op that
    parallelizes, spins on after it for a millisecond or more, taking a core from the team, the HTTP side and the
    client. Served A/B at 64 and 16 streams with OpenMP's workers made to sleep instead: ITL p50 43-50 against
    46-54 ms at 64, 24-26 against 28-29 ms at 16, and more tokens a second in 5 of 6 rounds."""
    ops = torch.ops.adapter_service
    was_on = ops.kernel_threads(True)
    try:
        yield
    finally:
        if not was_on:
            ops.kernel_threads(False)


@contextlib.contextmanager
def torch_threads() -> Iterator[None]:
    """Inside ``kernel_threads``: torch's own ops get the thread's count back for a while, for work they do well in
    parallel (a long prompt chunk's attention, sampling's softmax and sort over the vocabulary). Elsewhere (or
    without the kernels) nothing changes."""
    if not _state.get("loaded"):
        yield
        return
    ops = torch.ops.adapter_service
    was_on = ops.kernel_threads(False)
    try:
        yield
    finally:
        if was_on:
            ops.kernel_threads(True)


def _build() -> bool:
    if hasattr(torch.ops, "adapter_service") and hasattr(torch.ops.adapter_service, "slot_attention"):
        return True
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=build_name(),
            sources=[str(path) for path in sorted(_SOURCE_DIR.glob("*.cpp"))],
            extra_cflags=["-O3", "-march=native", "-fopenmp", *_vector_flags()],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no headers, a failed build: the torch ops do the same work
        logger.warning("fused CPU kernels unavailable (%s); the owned forward runs them as torch ops",
                       str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return False
    return True


if __name__ == "__main__":  # scripts/install.sh builds them once, so the service's first start does not wait
    logging.basicConfig(level=logging.INFO)
    print("fused CPU kernels:", "built" if cpu_kernels_available() else "unavailable (torch ops are used)")
