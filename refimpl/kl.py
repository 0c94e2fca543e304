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

__all__ = [
    "optimal_policy",
    "log_partition",
    "kl_divergence",
    "regularized_objective",
    "total_variation",
]


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    if not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be positive and finite, got {beta}")


def _check_same_shape(**tensors: Tensor) -> None:
    names = list(tensors)
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension (the support)")
    # Leading (batch) dimensions broadcast; the support (last dim) must match exactly.
    first = tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        try:
            torch.broadcast_shapes(t.shape, first.shape)
        except RuntimeError:
            ok = False
        else:
            ok = t.shape[-1] == first.shape[-1]
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {names[0]} has shape {tuple(first.shape)}: "
                "the last (support) dimension must match and leading dimensions must broadcast"
            )


def log_partition(logp_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    r"""log Z = log sum_y pi_ref(y) exp(r(y)/beta)   (eq. :math:`Z`).

    Args:
        logp_ref: [..., N] log pi_ref over the support (normalised on the last dim).
        reward: [..., N] r(y).
        beta: KL coefficient, > 0.

    Returns:
        [...] log Z.
    """
    _check_beta(beta)
    _check_same_shape(logp_ref=logp_ref, reward=reward)
    return torch.logsumexp(logp_ref + reward / beta, dim=-1)


def optimal_policy(logp_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    r"""log pi*(y) = log pi_ref(y) + r(y)/beta - log Z   (the Gibbs optimum).

    Args:
        logp_ref: [..., N] log pi_ref.
        reward: [..., N] r(y).
        beta: KL coefficient, > 0.

    Returns:
        [..., N] log pi*, normalised on the last dim (``-inf`` where pi_ref is 0).
    """
    _check_beta(beta)
    _check_same_shape(logp_ref=logp_ref, reward=reward)
    return torch.log_softmax(logp_ref + reward / beta, dim=-1)


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    r"""KL(p||q) = sum_y p(y) (log p(y) - log q(y)), with 0·log 0 = 0.

    Returns ``+inf`` where p puts mass on a y with q(y) = 0.

    Args:
        logp: [..., N] log p (normalised).
        logq: [..., N] log q (normalised).

    Returns:
        [...] KL(p||q) >= 0.
    """
    _check_same_shape(logp=logp, logq=logq)
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
    _check_beta(beta)
    _check_same_shape(logp=logp, logp_ref=logp_ref, reward=reward)
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
    _check_same_shape(logp=logp, logq=logq)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
