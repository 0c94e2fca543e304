"""Timing helpers shared by the benchmarks: medians of several runs, synchronized on CUDA."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()`` call in seconds, synchronized on CUDA before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))


def describe(device: torch.device) -> str:
    """One line naming the device and the versions, for the benchmark's header."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}"


def memory_bandwidth(device: torch.device, n_bytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth in bytes/s (read + write) of a large tensor on ``device``."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, repeats=5)
    return 2 * n_bytes / t
