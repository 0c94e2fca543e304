r"""Evaluation metrics and the book's one way of stating uncertainty.

* :func:`pass_at_k` -- the unbiased pass@k estimator (Chen et al. 2021).
* :func:`mean_ci` -- a mean and the half-width of its Student-t interval over n replications
  (n small: seeds, base models), never a normal z over three seeds.
* :func:`paired_diff` -- A minus B on the same units (same sample pools, seeds, base models):
  the mean difference and its t interval. "A beats B" means this interval excludes zero.
* :func:`bootstrap_ci` -- a percentile bootstrap of a mean over units that vary (prompts).
* :func:`auc` -- the area under the ROC curve, P(score of a positive > score of a negative).

Every interval names its unit of replication where it is reported; these functions take the
units along ``dim``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks

__all__ = ["pass_at_k", "Interval", "mean_ci", "paired_diff", "bootstrap_ci", "auc", "t_quantile"]


def pass_at_k(n_correct: Tensor, n: int, k: int) -> Tensor:
    r"""Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), per prompt.

    Args:
        n_correct: [P] number c of correct samples among n per prompt (integers in [0, n]).
        n: samples drawn per prompt, >= 1.
        k: budget, 1 <= k <= n.

    Returns:
        [P] float64 estimates of P(at least one of k samples is correct).
    """
    n = checks.integer("n", n, low=1)
    k = checks.integer("k", k, low=1, high=n)
    c = _values("n_correct", n_correct, 0) if not isinstance(n_correct, Tensor) or n_correct.dim() else None
    if c is None:
        raise ValueError("n_correct must be a 1-D tensor or list of counts, one per prompt")
    if bool(((c < 0) | (c > n) | (c != c.round())).any()):
        raise ValueError(f"n_correct must hold integers in [0, n={n}]")
    # C(n-c, k)/C(n, k) = prod_{i=0}^{k-1} (n-c-i)/(n-i), computed stably as a product.
    i = torch.arange(k, dtype=torch.float64, device=c.device)
    ratio = ((n - c.unsqueeze(-1) - i) / (n - i)).clamp(min=0).prod(-1)
    return 1.0 - ratio


def t_quantile(level: float, dof: int) -> float:
    """The two-sided Student-t critical value t_{(1+level)/2, dof}."""
    from scipy import stats

    level = checks.real("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    dof = checks.integer("dof", dof, low=1)
    return float(stats.t.ppf(0.5 + level / 2, dof))


class Interval(NamedTuple):
    """A point estimate and the half-width of its interval: ``mean ± half``."""

    mean: float
    half: float

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        """True when the interval lies strictly on one side of zero."""
        return self.low > 0 or self.high < 0

    def __format__(self, spec: str) -> str:
        """``f"{iv:.2f}"`` formats both numbers; a spec without a precision gets 3 decimals
        (``f"{iv:>8}"`` -> ``"   0.355 ±    0.002"``)."""
        spec = spec or ".3f"
        if "." not in spec:
            spec += ".3f"
        return f"{self.mean:{spec}} ± {self.half:{spec}}"


def _values(name: str, x, dim: int) -> Tensor:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be numbers (a list or a tensor), got {type(x).__name__}")
    try:
        x = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be numbers (a list or a tensor), got {type(x).__name__}") from e
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} must hold at least one value along one dimension (the units), "
                         f"got shape {tuple(x.shape)}")
    checks.finite(name, x)
    return x.movedim(checks.integer("dim", dim, low=-x.dim(), high=x.dim() - 1), 0)


def mean_ci(x, dim: int = 0, level: float = 0.95) -> Interval:
    r"""Mean over ``dim`` and the half-width t_{n-1} · s / sqrt(n) of its Student-t interval.

    Args:
        x: values, one per unit of replication along ``dim`` (a list or a tensor); other dims are
            averaged first. At least 2 units.
        level: confidence level in (0, 1).

    Returns:
        :class:`Interval` of floats.
    """
    x = _values("x", x, dim)
    x = x.reshape(x.shape[0], -1).mean(1)  # [n] one value per unit
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 units along dim {dim} for an interval, got {n}")
    return Interval(x.mean().item(), t_quantile(level, n - 1) * x.std().item() / math.sqrt(n))


def paired_diff(a, b, dim: int = 0, level: float = 0.95) -> Interval:
    r"""Mean of a - b over paired units along ``dim``, with its Student-t interval.

    ``a`` and ``b`` must come from the same units (the same sample pools, seeds, base models), so
    that what the units share cancels in the difference.
    """
    a, b = _values("a", a, dim), _values("b", b, dim)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired (same shape), got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_ci(a - b, 0, level)


def bootstrap_ci(x, dim: int = 0, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    r"""Mean over ``dim`` with a percentile-bootstrap interval, resampling the units along ``dim``.

    The interval is returned as a symmetric half-width around the mean: the larger of the two
    distances from the mean to the percentile bounds (conservative when skewed).
    """
    x = _values("x", x, dim)
    x = x.reshape(x.shape[0], -1).mean(1)  # [n]
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 units along dim {dim} to bootstrap, got {n}")
    n_boot = checks.integer("n_boot", n_boot, low=10)
    level = checks.real("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    g = torch.Generator().manual_seed(checks.integer("seed", seed))
    means = x[torch.randint(n, (n_boot, n), generator=g)].mean(1)  # [n_boot]
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    m = x.mean().item()
    return Interval(m, max(m - lo, hi - m))


def auc(scores: Tensor, labels: Tensor) -> float:
    r"""P(score of a positive > score of a negative), ties counting one half (the ROC AUC).

    Args:
        scores: [n] real scores.
        labels: [n] 0/1 (or bool) labels, both classes present.
    """
    checks.tensor("scores", scores, dims=1, floating=True)
    checks.finite("scores", scores)
    checks.tensor("labels", labels, dims=1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but scores has {tuple(scores.shape)}")
    pos = labels.bool()
    if bool(((labels != 0) & (labels != 1)).any()) or pos.all() or (~pos).all():
        raise ValueError("labels must be 0/1 with both classes present")
    s = scores.double()
    # Rank-based (Mann-Whitney U): average ranks handle ties.
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64, device=s.device).scatter_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]  # average rank within ties
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()
