r"""Resampling a particle system: which particles survive, and how many copies each gets.

Given k particles with weights w_i (log weights, -inf for 0), resampling draws k new particles with
E[#copies of i] = k W_i, W_i = w_i / Σ_j w_j (Gordon et al. 1993; Douc & Cappé 2005 compare the
schemes): multinomial (k i.i.d. draws) or systematic (one uniform U, the points (U + j) / k: the
least added variance). SMC resamples when the effective sample size ESS = (Σ w)² / Σ w² falls below
a threshold (:func:`resample_low_ess`); the final draw from a weighted system is
:func:`resample_index` (:mod:`refimpl.smc`, :mod:`refimpl.idle`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks

__all__ = ["resample_index", "ancestors", "resample_low_ess"]


def _probs(log_w: Tensor) -> Tensor:
    """w / Σ w over the last dim, with -inf weights (0) allowed; a row of zeros raises."""
    if bool(torch.isneginf(log_w).all(-1).any()):
        raise ValueError("log_w has a group whose weights are all 0 (-inf): there is nothing to resample")
    checks.finite("log_w", log_w, allow_neg_inf=True)
    return torch.softmax(log_w.float() - log_w.float().amax(-1, keepdim=True), -1)


def resample_index(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[...] one index I ~ w_I / Σ_i w_i per row of ``log_w`` [..., k] (a weight of 0 is never chosen)."""
    p = _probs(checks.tensor("log_w", log_w, min_dims=1, floating=True))
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])


def ancestors(log_w: Tensor, scheme: str = "systematic", generator: torch.Generator | None = None) -> Tensor:
    r"""[B, k] ancestor indices of k new particles per row of ``log_w`` [B, k], E[#copies of i] = k W_i.

    ``multinomial``: k i.i.d. draws; ``systematic``: one uniform U, the points (U + j) / k.
    """
    checks.choice("scheme", scheme, ("multinomial", "systematic"))
    p = _probs(checks.tensor("log_w", log_w, dims=2, floating=True))  # [B, k]
    B, k = p.shape
    if scheme == "multinomial":
        return torch.multinomial(p, k, replacement=True, generator=generator)
    u = (torch.rand(B, 1, generator=generator, device=p.device) + torch.arange(k, device=p.device)) / k  # [B, k]
    c = p.cumsum(-1)
    return torch.searchsorted(c / c[:, -1:], u, right=True).clamp(max=k - 1)



def resample_low_ess(log_w: Tensor, B: int, k: int, ess_threshold: float, scheme: str):
    """One SMC resampling step on the log weights [N = B·k] of B groups of k particles: the groups
    whose ESS < ess_threshold · k (all of them at 1) get k new particles by ``scheme``, their weights
    reset to the mean (which keeps the product of mean weights an unbiased estimate of Z).

    Returns:
        ESS [B] before resampling, resampled [B] bool, log weights [N] after, and the new
        particles' rows [N] (``None`` when no group was resampled).
    """
    B, k = checks.integer("B", B, low=1), checks.integer("k", k, low=1)
    if checks.tensor("log_w", log_w, dims=1, floating=True).shape[0] != B * k:
        raise ValueError(f"log_w must have B·k = {B * k} entries, got shape {tuple(log_w.shape)}")
    ess_threshold = checks.real("ess_threshold", ess_threshold, low=0.0, high=1.0)
    checks.choice("scheme", scheme, ("multinomial", "systematic"))
    _probs(log_w.view(B, k))  # finite or -inf, and no group of zeros
    return _resample_low_ess(log_w, B, k, ess_threshold, scheme)


def _resample_low_ess(log_w: Tensor, B: int, k: int, ess_threshold: float, scheme: str):
    """:func:`resample_low_ess` without the checks (the SMC loop)."""
    lw = log_w.view(B, k)
    ess = torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))
    need = torch.ones_like(ess, dtype=torch.bool) if ess_threshold == 1 else ess < ess_threshold * k
    if not bool(need.any()):
        return ess, need, log_w, None
    anc = torch.where(need[:, None], ancestors(lw, scheme), torch.arange(k, device=lw.device).expand(B, k))
    mean = (torch.logsumexp(lw, -1) - math.log(k))[:, None].expand(B, k)
    index = (torch.arange(B, device=lw.device)[:, None] * k + anc).reshape(-1)  # [N]
    return ess, need, torch.where(need[:, None], mean, lw).reshape(-1), index
