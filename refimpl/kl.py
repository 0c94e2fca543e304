r"""Exact KL-constrained quantities over a finite support (the last tensor dimension).

The book's central object (chapter :ref:`kl-optimum`) is the maximiser of

.. math::  J(\pi) = \mathbb{E}_{y\sim\pi}[r(y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{\mathrm{ref}}),

namely :math:`\pi^*(y) = \pi_{\mathrm{ref}}(y)\,e^{r(y)/\beta} / Z` with
:math:`Z = \sum_y \pi_{\mathrm{ref}}(y)\,e^{r(y)/\beta}` and :math:`J(\pi^*) = \beta \log Z`.
Every function works in log space, is batched over leading dimensions (which broadcast), and
is differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks

__all__ = [
    "optimal_policy",
    "log_partition",
    "kl_divergence",
    "regularized_objective",
    "total_variation",
]


def _check(beta: float | None = None, **tensors: Tensor) -> float | None:
    """Validate beta (> 0, finite) and tensors over a shared support: floating, at least 1-D, on one
    device, no NaN or +inf (-inf is allowed in log-probabilities and rewards), equal last dims and
    broadcastable leading dims."""
    names = list(tensors)
    for name, t in tensors.items():
        checks.tensor(name, t, min_dims=1, floating=True)
    checks.same_device(**tensors)
    for name, t in tensors.items():
        # -inf: a log-probability of 0, or a reward that forbids an outcome (r = log 1[allowed])
        checks.finite(name, t, allow_neg_inf=name.startswith("log") or name == "reward")
    first = tensors[names[0]]
    if first.shape[-1] < 1:
        raise ValueError(f"{names[0]} must have a support of N >= 1 outcomes (last dim), got shape {tuple(first.shape)}")
    for name in names[1:]:
        t = tensors[name]
        try:
            torch.broadcast_shapes(t.shape, first.shape)
            ok = t.shape[-1] == first.shape[-1]
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {names[0]} has shape {tuple(first.shape)}: "
                "the last (support) dimension must match and leading dimensions must broadcast"
            )
    return None if beta is None else checks.beta(beta)


def _tilt(logp_ref: Tensor, reward: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(log pi_ref + (r - m)/beta, m/beta) with m the largest reward on the support of pi_ref.

    Subtracting m first keeps every exponent <= 0 on the support, so a large r/beta cannot
    overflow into inf - inf = NaN; outside the support the tilt stays -inf.
    """
    on_support = ~torch.isneginf(logp_ref)
    reward = reward.expand(torch.broadcast_shapes(reward.shape, logp_ref.shape))
    m = torch.where(on_support, reward, torch.full_like(reward, float("-inf"))).amax(-1, keepdim=True)
    if bool(torch.isneginf(m).any()):
        raise ValueError("reward is -inf (forbidden) everywhere on the support of logp_ref in some row: "
                         "no policy is left")
    tilted = torch.where(on_support, logp_ref + (reward - m) / beta, torch.full_like(logp_ref, float("-inf")))
    return tilted, (m / beta).squeeze(-1)


def log_partition(logp_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    r"""log Z = log sum_y pi_ref(y) exp(r(y)/beta)   (eq. :math:`Z`).

    Args:
        logp_ref: [..., N] log pi_ref over the support (normalised on the last dim).
        reward: [..., N] r(y).
        beta: KL coefficient, > 0.

    Returns:
        [...] log Z.
    """
    beta = _check(beta, logp_ref=logp_ref, reward=reward)
    tilted, shift = _tilt(logp_ref, reward, beta)
    if not bool(torch.isfinite(shift).all()):
        raise ValueError(f"log Z = max r / beta + ... overflows {reward.dtype}: use float64 tensors or a larger beta")
    return torch.logsumexp(tilted, dim=-1) + shift


def optimal_policy(logp_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    r"""log pi*(y) = log pi_ref(y) + r(y)/beta - log Z   (the Gibbs optimum).

    Args:
        logp_ref: [..., N] log pi_ref.
        reward: [..., N] r(y).
        beta: KL coefficient, > 0.

    Returns:
        [..., N] log pi*, normalised on the last dim (``-inf`` where pi_ref is 0).
    """
    beta = _check(beta, logp_ref=logp_ref, reward=reward)
    return torch.log_softmax(_tilt(logp_ref, reward, beta)[0], dim=-1)


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    r"""KL(p||q) = sum_y p(y) (log p(y) - log q(y)), with 0·log 0 = 0.

    Returns ``+inf`` where p puts mass on a y with q(y) = 0.

    Args:
        logp: [..., N] log p (normalised).
        logq: [..., N] log q (normalised).

    Returns:
        [...] KL(p||q) >= 0.
    """
    _check(logp=logp, logq=logq)
    p = logp.exp()
    # 0·log 0 = 0: terms with p = 0 contribute nothing, even where q = 0 too.
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def regularized_objective(logp: Tensor, logp_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    r"""J(p) = E_p[r] - beta·KL(p||pi_ref)   (the objective pi* maximises).

    Args:
        logp: [..., N] log p.
        logp_ref: [..., N] log pi_ref.
        reward: [..., N] r(y).
        beta: KL coefficient, > 0.

    Returns:
        [...] J(p); at p = pi* it equals beta·log Z.
    """
    beta = _check(beta, logp=logp, logp_ref=logp_ref, reward=reward)
    p = logp.exp()
    expected = (p * torch.where(p > 0, reward, torch.zeros_like(reward))).sum(-1)
    return expected - beta * kl_divergence(logp, logp_ref)


def total_variation(logp: Tensor, logq: Tensor) -> Tensor:
    r"""TV(p, q) = ½ sum_y abs(p(y) - q(y)).

    Args:
        logp: [..., N] log p.
        logq: [..., N] log q.

    Returns:
        [...] TV in [0, 1].
    """
    _check(logp=logp, logq=logq)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
