"""Pick the best available device: CUDA GPU, then Apple MPS, then CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch


def get_device(verbose: bool = True) -> torch.device:
    """Return cuda → mps → cpu, whichever comes first, and print a one-line report."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        report = f"Using CUDA GPU: {name} ({memory:.0f} GiB), torch {torch.__version__}"
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
        report = f"Using Apple GPU (MPS), torch {torch.__version__}"
    else:
        device = torch.device("cpu")
        threads = torch.get_num_threads()
        bf16 = ", bf16 in hardware" if has_native_bf16(device) else ""
        report = f"Using CPU ({threads} threads{bf16}), torch {torch.__version__}: no GPU found"
    if verbose:
        print(report)
    return device


def has_native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run in hardware: CUDA GPUs of compute capability 8.0 or
    newer (A100, H100, RTX 30xx...) and CPUs with AVX512-BF16 or AMX (recent Xeon and EPYC).
    Elsewhere (Colab's free T4, most laptops) bf16 is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":  # PyTorch's own CPU feature checks (absent in old versions)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


@dataclass(frozen=True)
class Capabilities:
    """What the training path may use on one device: decided here, once per device
    (``capabilities(device)``), and passed to wherever it matters."""

    device: torch.device
    bf16_autocast: bool  # every forward pass in bf16: CUDA GPUs with bf16 in hardware
    bf16_large_products: bool  # the LM's vocabulary head in bf16: CPUs with bf16 in hardware
    fused_adamw: bool  # one fused kernel updates every parameter: CUDA GPUs and CPUs
    cuda_graphs: bool  # a training step replayed as one CUDA graph: CUDA GPUs
    pad_multiple: int  # batch lengths rounded up to it: few shapes, few graphs (CUDA), else 1

    def autocast(
        self, large_products: bool = False, cache_enabled: bool = True
    ) -> AbstractContextManager:
        """bf16 autocast where it pays, else a no-op: every forward pass on a CUDA GPU with bf16
        in hardware; on such a CPU only around ``large_products`` (the LM's vocabulary head:
        about twice as fast), as the casts cost more than small products save. (CUDA graph
        capture needs ``cache_enabled=False``.)"""
        if self.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
        if large_products and self.bf16_large_products:
            return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return nullcontext()


def capabilities(device: torch.device | str) -> Capabilities:
    """The device's ``Capabilities`` (decided at the first call, then remembered)."""
    return _capabilities(torch.device(device))


@cache
def _capabilities(device: torch.device) -> Capabilities:
    cuda, bf16 = device.type == "cuda", has_native_bf16(device)
    return Capabilities(
        device=device,
        bf16_autocast=cuda and bf16,
        bf16_large_products=device.type == "cpu" and bf16,
        fused_adamw=device.type in ("cuda", "cpu"),
        cuda_graphs=cuda,
        pad_multiple=16 if cuda else 1,
    )


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 21) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call, waiting for the GPU
    to finish each call (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def resident_mib() -> float | None:
    """This process's resident memory (RSS) in MiB, read from ``/proc`` (Linux); else None."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_freed_memory() -> None:
    """Hand memory that was freed but kept by C's allocator back to the system (glibc's
    ``malloc_trim``), so that a resident-memory measurement starts from what is really used."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory used while the ``with`` block runs, in MiB (``.mib``): the CUDA allocator's
    peak on a GPU; on a CPU, the peak resident memory above where it started, sampled every
    few milliseconds by a thread (Linux; ``None`` elsewhere)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.mib: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # cached blocks of earlier work do not count
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            release_freed_memory()
            self._start = self._peak = resident_mib()
            if self._start is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, resident_mib())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        elif self._start is not None:
            self._stop.set()
            self._thread.join()
            self.mib = max(self._peak, resident_mib()) - self._start
