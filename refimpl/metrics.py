"""Evaluation metrics shared by the chapters."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pass_at_k", "mean_ci"]


def pass_at_k(n_correct: Tensor, n: int, k: int) -> Tensor:
    r"""Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), per prompt.

    Args:
        n_correct: [P] number c of correct samples among n per prompt.
        n: samples drawn per prompt.
        k: budget, 1 <= k <= n.

    Returns:
        [P] float64 estimates of P(at least one of k samples is correct).
    """
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    c = torch.as_tensor(n_correct, dtype=torch.float64)
    if ((c < 0) | (c > n)).any():
        raise ValueError(f"n_correct must lie in [0, n={n}]")
    # C(n-c, k)/C(n, k) = prod_{i=0}^{k-1} (n-c-i)/(n-i), computed stably as a product.
    i = torch.arange(k, dtype=torch.float64, device=c.device)
    ratio = ((n - c.unsqueeze(-1) - i) / (n - i)).clamp(min=0).prod(-1)
    return 1.0 - ratio


def mean_ci(x: Tensor, dim: int = 0, z: float = 1.96) -> tuple[Tensor, Tensor]:
    """Mean and the half-width z·s/sqrt(n) of its normal-approximation confidence interval."""
    x = torch.as_tensor(x, dtype=torch.float64)
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"need at least 2 values along dim {dim} for a confidence interval, got {n}")
    return x.mean(dim), z * x.std(dim) / n**0.5
