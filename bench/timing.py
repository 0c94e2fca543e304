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


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each ``fns[name]()`` over ``repeats`` rounds, after ``warmup`` rounds. The
    contenders run in turn within a round (so that a slow spell of a shared machine hits all of
    them), and the order rotates from round to round (so that no contender always runs first)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(time_once(fns[name], device))
    return times


def spread(times: list[float], scale: float = 1.0) -> str:
    """``median [min, max]`` of ``times`` multiplied by ``scale``."""
    v = sorted(t * scale for t in times)
    return f"{statistics.median(v):.4g} [{v[0]:.4g}, {v[-1]:.4g}]"


def ratio_spread(num: list[float], den: list[float]) -> str:
    """Median and range of the per-round ratios ``num[i] / den[i]`` (paired: measured in the same round)."""
    return spread([a / b for a, b in zip(num, den)])


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Measured throughput (FLOP/s) of an n x n matmul in ``dtype`` on ``device``: the compute bound."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / median_time(lambda: a @ b, device, repeats=5)
