r"""Evaluation metrics and the book's one way of stating uncertainty.

* :func:`pass_at_k` -- the unbiased pass@k estimator (Chen et al. 2021).
* :func:`mean_ci` -- a mean and the half-width of its Student-t interval over n replications
  (n small: seeds, base models), never a normal z over three seeds.
* :func:`paired_diff` -- A minus B on the same units (same sample pools, seeds, base models):
  the mean difference and its t interval. "A beats B" means this interval excludes zero.
* :func:`bootstrap_ci` -- a percentile bootstrap of a mean over units that vary (prompts).
* :func:`cluster_bootstrap` -- the hierarchical bootstrap of a grand mean over base models (the unit
  of replication), seeds or pools nested in them, and prompts crossed with them.
* :func:`decide` -- a claim decided on an interval: it clears a threshold, or lies within a margin of it.
* :func:`auc` -- the area under the ROC curve, P(score of a positive > score of a negative).

Every interval names its unit of replication where it is reported (``unit=``, carried by the
:class:`Interval`); the one-level functions take the units along ``dim``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks

__all__ = ["pass_at_k", "Interval", "mean_ci", "paired_diff", "bootstrap_ci", "cluster_bootstrap", "Decision",
           "decide", "DIRECTIONS", "auc", "t_quantile"]


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
    if getattr(n_correct, "dtype", None) == torch.bool or isinstance(n_correct, list) and bool in map(type, n_correct):
        raise TypeError("n_correct must hold counts (ints), not booleans: pass mask.sum() per prompt")
    c = _values("n_correct", n_correct, 0) if not isinstance(n_correct, Tensor) or n_correct.dim() else None
    if c is None:
        raise ValueError("n_correct must be a 1-D tensor or list of counts, one per prompt")
    if bool(((c < 0) | (c > n) | (c != c.round())).any()):
        raise ValueError(f"n_correct must hold integers in [0, n={n}]")
    if k > 4096:  # C(n-c, k)/C(n, k) through log-gamma: the product would need k terms per prompt
        log_ratio = torch.lgamma(n - c + 1) - torch.lgamma((n - c - k + 1).clamp(min=1)) - math.lgamma(n + 1)
        return 1.0 - torch.where(n - c >= k, (log_ratio + math.lgamma(n - k + 1)).exp(), torch.zeros_like(c))
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


class Interval(tuple):
    """A point estimate and the half-width of its interval: ``mean ± half``.

    A pair: it unpacks (``m, h = iv``), compares and records (``report.record(x=tuple(iv))``) as
    ``(mean, half)``. It may also carry, as attributes outside the pair, ``se`` (the estimate's
    standard error), ``level`` (the confidence level) and ``unit`` (the unit of replication, e.g.
    ``"base model × prompt"``); they are ``None`` when unknown. Immutable.
    """

    def __new__(cls, mean: float, half: float, se: float | None = None, level: float | None = None,
                unit: str | None = None):
        for name, v in (("mean", mean), ("half", half), ("se", 0.0 if se is None else se)):
            if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__} ({v!r})")
            if name != "mean" and not float(v) >= 0 and float(v) == float(v):  # NaN stays reportable
                raise ValueError(f"{name} must be >= 0, got {v}")
        self = super().__new__(cls, (float(mean), float(half)))
        level = None if level is None else checks.real("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
        self.__dict__.update(se=None if se is None else float(se), level=level, unit=_unit(unit))
        return self

    def __setattr__(self, name, value):
        raise AttributeError("an Interval is immutable")

    def __reduce__(self):
        return type(self), (self[0], self[1], self.se, self.level, self.unit)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("se", "level", "unit") if getattr(self, k) is not None)
        return f"Interval(mean={self[0]!r}, half={self[1]!r}{extra})"

    mean = property(lambda self: self[0], doc="the point estimate")
    half = property(lambda self: self[1], doc="the half-width: the interval is [mean - half, mean + half]")

    low = property(lambda self: self.mean - self.half, doc="the lower end, mean - half")
    high = property(lambda self: self.mean + self.half, doc="the upper end, mean + half")

    def excludes_zero(self) -> bool:
        """True when the interval lies strictly on one side of zero."""
        return self.low > 0 or self.high < 0

    def __format__(self, spec: str) -> str:
        """``f"{iv:.2f}"`` formats both numbers; a spec without a precision gets 3 decimals
        (``f"{iv:>8}"`` -> ``"   0.355 ±    0.002"``)."""
        spec = spec if "." in spec else spec + ".3f"
        return f"{self.mean:{spec}} ± {self.half:{spec.replace('+', '')}}"  # a width carries no sign


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


def _scale(*xs: Tensor) -> float:
    """1, or a power of two (exact) that brings values beyond 2^500 down: sums and squares stay finite."""
    return 1.0 if (top := max(x.abs().max().item() for x in xs)) <= 2.0**500 else math.ldexp(1.0, math.frexp(top)[1] - 1)


def _rescaled(iv: Interval, s: float, name: str = "x") -> Interval:
    """``iv``, computed on data divided by s, at the data's scale (its width must fit a float)."""
    if s != 1.0 and not math.isfinite(iv.half * s):
        raise ValueError(f"{name}: the interval's half-width overflows float64")
    return iv if s == 1.0 else Interval(iv.mean * s, iv.half * s, iv.se * s, iv.level, iv.unit)


def mean_ci(x, dim: int = 0, level: float = 0.95, unit: str | None = None) -> Interval:
    r"""Mean over ``dim`` and the half-width t_{n-1} · s / sqrt(n) of its Student-t interval.

    Args:
        x: values, one per unit of replication along ``dim`` (a list or a tensor); other dims are
            averaged first. At least 2 units.
        level: confidence level in (0, 1).
        unit: the unit of replication, carried by the result (e.g. ``"base model"``).

    Returns:
        :class:`Interval` of floats, with ``se`` = s / sqrt(n).
    """
    x = _values("x", x, dim)
    x = (x / (s := _scale(x))).reshape(x.shape[0], -1).mean(1)  # [n] one value per unit
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 units along dim {dim} for an interval, got {n}")
    se = x.std().item() / math.sqrt(n)
    return _rescaled(Interval(x.mean().item(), t_quantile(level, n - 1) * se, se, level, _unit(unit)), s)


def paired_diff(a, b, dim: int = 0, level: float = 0.95, unit: str | None = None) -> Interval:
    r"""Mean of a - b over paired units along ``dim``, with its Student-t interval.

    ``a`` and ``b`` must come from the same units (the same sample pools, seeds, base models), so
    that what the units share cancels in the difference. Tensors share a device (a list: the CPU).
    """
    checks.same_device(**{n: x if isinstance(x, Tensor) else torch.device("cpu") for n, x in (("a", a), ("b", b))})
    a, b = _values("a", a, dim), _values("b", b, dim)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired (same shape), got {tuple(a.shape)} and {tuple(b.shape)}")
    s = _scale(a, b)  # a - b of values near 1e308 would overflow: rescaled first
    return _rescaled(mean_ci(a / s - b / s, 0, level, unit), s, "a - b") if s != 1.0 else mean_ci(a - b, 0, level, unit)


def bootstrap_ci(x, dim: int = 0, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                 unit: str | None = None) -> Interval:
    r"""Mean over ``dim`` with a percentile-bootstrap interval, resampling the units along ``dim``.

    The interval is returned as a symmetric half-width around the mean: the larger of the two
    distances from the mean to the percentile bounds (conservative when skewed); ``se`` is the
    standard deviation of the bootstrap means.
    """
    x = _values("x", x, dim)
    x = (x / (s := _scale(x))).reshape(x.shape[0], -1).mean(1)  # [n]
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 units along dim {dim} to bootstrap, got {n}")
    n_boot = checks.integer("n_boot", n_boot, low=10)
    level = checks.real("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    g = torch.Generator().manual_seed(checks.integer("seed", seed))
    means = x[torch.randint(n, (n_boot, n), generator=g)].mean(1)  # [n_boot]
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    m = x.mean().item()
    return _rescaled(Interval(m, max(m - lo, hi - m), means.std().item(), level, _unit(unit)), s)


def _unit(unit):
    if unit is not None and (not isinstance(unit, str) or not unit.strip()):
        raise ValueError(f"unit must be a non-empty string naming the unit of replication, got {unit!r}")
    return unit


def cluster_bootstrap(x, level: float = 0.95, n_boot: int = 2000, seed: int = 0, unit: str | None = None) -> Interval:
    r"""Grand mean of ``x`` with a hierarchical (cluster) percentile-bootstrap interval.

    ``x[m, s, p]``: base model m (the unit of replication), seed or sample pool s nested in model m,
    prompt p. The prompts are *crossed* with the models (every model answers the same prompts), so
    one bootstrap draw resamples with replacement, independently, M models, P prompt indices (the
    same ones for every drawn model) and, inside each drawn model, S seeds:

        θ* = 1/(M S P) · Σ_j Σ_i Σ_q x[m*_j, s*_{j,i}, p*_q]

    (Owen's pigeonhole bootstrap for the crossed models and prompts, with the seeds nested in the
    models). A paired comparison passes the difference array a - b. It overstates the share of the
    model × prompt interaction (conservative) and understates the models' share by (M - 1) / M
    with a normal rather than a t_{M-1} spread: with M = 6 and models that differ more than the
    prompts, a 95% interval covers only about 86-90% of the time (``tests/test_metrics.py``).

    Args:
        x: [M, P] or [M, S, P] finite values (a tensor or nested lists), M >= 2 base models.
        level: confidence level in (0, 1).
        n_boot: bootstrap draws, >= 10.
        seed: seed of the draws (same seed, same interval).
        unit: the unit of replication the result names; default ``"base model × prompt"`` or
            ``"base model × seed × prompt"``.

    Returns:
        :class:`Interval`: the grand mean, the larger distance from it to the two percentile bounds
        (symmetric, conservative when skewed), ``se`` = the standard deviation of θ*, ``level``, ``unit``.
    """
    x = _values("x", x.detach().cpu() if isinstance(x, Tensor) else x, 0)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [M, P] (base models × prompts) or [M, S, P] (base models × seeds × "
                         f"prompts), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 base models along dim 0, got {x.shape[0]}")
    level = checks.real("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    n_boot = checks.integer("n_boot", n_boot, low=10)
    g = torch.Generator().manual_seed(checks.integer("seed", seed))
    unit = _unit(unit) or ("base model × prompt" if x.dim() == 2 else "base model × seed × prompt")
    x = (x if x.dim() == 3 else x.unsqueeze(1)) / (s := _scale(x))
    M, S, P = x.shape
    models = torch.randint(M, (n_boot, M, 1), generator=g)  # [B, M, 1] drawn models
    seeds = torch.randint(S, (n_boot, M, S), generator=g)  # [B, M, S] seeds drawn inside each drawn model
    prompts = torch.randint(P, (n_boot, P), generator=g)  # [B, P] drawn prompts, shared by the drawn models
    counts = lambda idx, n: torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(  # noqa: E731
        1, idx, torch.ones(idx.shape, dtype=torch.float64))  # [B, n] times each index is drawn
    w = counts((models * S + seeds).view(n_boot, M * S), M * S)  # [B, M*S] per (model, seed) cell
    v = counts(prompts, P)  # [B, P] per prompt
    theta = ((w @ x.reshape(M * S, P)) * v).sum(1) / (M * S * P)  # [B]
    lo, hi = torch.quantile(theta, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    m = x.mean().item()
    return _rescaled(Interval(m, max(m - lo, hi - m), theta.std().item(), level, unit), s)


DIRECTIONS = (">", "<", "within")


class Decision(NamedTuple):
    """A claim decided on an interval."""

    holds: bool
    margin_se: float | None  # how far the statistic lies inside the claimed region, in standard errors


def decide(interval: Interval, threshold: float, direction: str, margin: float | None = None) -> Decision:
    r"""A claim as a decision on an interval [low, high] of a statistic fixed in advance:

    * ``">"``: holds iff low > threshold; ``"<"``: holds iff high < threshold;
    * ``"within"`` (equivalence, "the same up to ``margin``"): holds iff
      threshold - margin < low and high < threshold + margin. Pass a (1 - 2α) interval for a test
      at level α (two one-sided tests, TOST: ``level=0.90`` for 5%).

    ``margin_se`` is (statistic - threshold) / se for ``">"``, (threshold - statistic) / se for ``"<"``, and
    the distance to the nearer equivalence bound over se for ``"within"`` (positive inside the claimed region;
    ``None`` when the interval carries no positive ``se``). A non-finite interval never holds.
    """
    if not isinstance(interval, Interval):
        raise TypeError(f"interval must be a metrics.Interval, got {type(interval).__name__}")
    threshold = checks.real("threshold", threshold)
    direction = checks.choice("direction", direction, DIRECTIONS)
    if (direction == "within") != (margin is not None):
        raise ValueError("margin (> 0) goes with direction 'within' and only with it, "
                         f"got direction={direction!r}, margin={margin!r}")
    margin = checks.real("margin", margin, low=0.0, low_open=True) if direction == "within" else None
    m, low, high, se = interval.mean, interval.low, interval.high, interval.se
    holds, dist = {">": (low > threshold, m - threshold), "<": (high < threshold, threshold - m),
                   "within": (threshold - (margin or 0.0) < low and high < threshold + (margin or 0.0),
                              (margin or 0.0) - abs(m - threshold))}[direction]
    finite = all(math.isfinite(v) for v in (m, interval.half))
    margin_se = dist / se if finite and se is not None and math.isfinite(se) and se > 0 else None
    return Decision(bool(holds) and finite, margin_se)


def auc(scores: Tensor, labels: Tensor) -> float:
    r"""P(score of a positive > score of a negative), ties counting one half (the ROC AUC).

    Args:
        scores: [n] real scores.
        labels: [n] 0/1 (or bool) labels, both classes present, on the device of ``scores``.
    """
    checks.same_device(scores=scores, labels=labels)
    checks.same_shape(scores=checks.tensor("scores", scores, dims=1, floating=True),
                      labels=checks.tensor("labels", labels, dims=1))
    checks.finite("scores", scores)
    pos = labels.bool()
    if bool(((labels != 0) & (labels != 1)).any()) or pos.all() or (~pos).all():
        raise ValueError("labels must be 0/1 with both classes present")
    s = scores.double()
    # Rank-based (Mann-Whitney U): average ranks handle ties.
    ranks = torch.empty_like(s).scatter_(0, torch.argsort(s), torch.arange(1, len(s) + 1, dtype=s.dtype, device=s.device))
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64, device=s.device).scatter_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]  # average rank within ties
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()
