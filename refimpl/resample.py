r"""Choosing one of k candidates by its weight: the mechanism every chapter of the book shares.

Given k candidates with scores s_1..s_k and a temperature beta >= 0, select candidate i with

    p_i = softmax_i(s / beta)          (beta = 0: the argmax, ties to the first index).

A Q-probe selects by its probe value (s = Q); importance resampling selects by a log weight
(s = log w, beta = 1); best-of-n is the beta = 0 case. When the candidates are i.i.d. draws from
a proposal q, the chosen one has the law

    P_k(y) = q(y) w(y) E[ k / (w(y) + S_{k-1}) ],   w = exp(s / beta),   S_{k-1} = sum of k-1 i.i.d. w(Y_j),

which tends to q(y) w(y) / E_q[w] (the KL-constrained optimum of chapter ``kl-optimum`` when
w = exp(r / beta)) as k grows. :func:`resampling_law` evaluates it over a finite support.
"""
from __future__ import annotations

from typing import Sequence

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks

__all__ = ["selection_weights", "select", "expected_value", "resampling_law", "effective_sample_size"]


def _scores(name: str, scores: Tensor) -> Tensor:
    checks.tensor(name, scores, min_dims=1, floating=True)
    if scores.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension of k >= 1 candidates, got shape {tuple(scores.shape)}")
    return checks.finite(name, scores)


def _weights(scores: Tensor, beta: float) -> Tensor:
    """softmax(scores / beta) without checks; computed in float32 or wider (half precision would
    overflow at scores / beta > 65504), returned in that precision."""
    s = scores if scores.dtype == torch.float64 else scores.float()
    if beta == 0:
        return F.one_hot(s.argmax(-1), s.shape[-1]).to(s.dtype)
    # (s - max) <= 0 cannot overflow upwards; an underflow to -inf is a weight of exactly 0.
    return torch.softmax((s - s.amax(-1, keepdim=True)) / beta, dim=-1)


def selection_weights(scores: Tensor, beta: float) -> Tensor:
    r"""p_i = softmax_i(s_i / beta) over the last dim; beta = 0 gives the one-hot argmax.

    Ties at beta = 0 go to the first index (``torch.argmax``'s rule).

    Args:
        scores: [..., k] finite scores of k candidates (any float dtype).
        beta: temperature, >= 0.

    Returns:
        [..., k] selection probabilities, float32 (float64 for float64 scores).
    """
    beta = checks.beta(beta, allow_zero=True)
    return _weights(_scores("scores", scores), beta)


def select(scores: Tensor, beta: float, generator: torch.Generator | None = None) -> Tensor:
    """Indices I ~ softmax(s / beta) of the chosen candidates (the argmax at beta = 0).

    Args:
        scores: [..., k].
        beta: temperature, >= 0.
        generator: for reproducible draws; it must live on ``scores``' device.

    Returns:
        [...] long indices in 0..k-1.
    """
    p = selection_weights(scores, beta)  # [..., k]
    checks.generator("generator", generator, p.device)
    if beta == 0:
        return p.argmax(-1)
    flat = p.reshape(-1, p.shape[-1])  # [B, k]
    return torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])


def expected_value(scores: Tensor, values: Tensor, beta: float) -> Tensor:
    r"""sum_i p_i v_i: the exact expected value of one softmax-over-k selection.

    Args:
        scores, values: [..., k] on one device (values: the reward of each candidate, say).
        beta: temperature, >= 0.

    Returns:
        [...] expected value.
    """
    checks.same_device(scores=scores, values=values)
    p = selection_weights(scores, beta)
    checks.tensor("values", values, floating=True)
    checks.same_shape(scores=scores, values=values)
    checks.finite("values", values)
    return (p * values.to(p.dtype)).sum(-1)


def resampling_law(log_proposal: Tensor, log_w: Tensor, ks: Sequence[int], n_mc: int = 2000,
                   generator: torch.Generator | None = None) -> Tensor:
    r"""log P_k: the law of the candidate chosen by importance resampling among k draws of a proposal.

    P_k(y) = q(y) w(y) E[k / (w(y) + S_{k-1})], with the expectation over S_{k-1}, the sum of the
    weights of k - 1 other i.i.d. draws from q, estimated by Monte Carlo. The same ``n_mc`` draws
    serve every y and every k (cumulative sums), and each P_k is normalized (a ratio estimator,
    exact at k = 1 where P_1 = q). A softmax-over-k sampler at temperature beta is the case
    log_w = score / beta.

    Args:
        log_proposal: [..., N] log q over a finite support (``-inf`` where q is 0).
        log_w: [..., N] log weights (``-inf`` allowed: a weight of 0).
        ks: candidate counts k >= 1.
        n_mc: Monte Carlo draws of the k - 1 others.
        generator: for reproducible draws (on the tensors' device).

    Returns:
        [len(ks), ..., N] log P_k.
    """
    checks.tensor("log_proposal", log_proposal, min_dims=1, floating=True)
    checks.tensor("log_w", log_w, floating=True)
    checks.same_device(log_proposal=log_proposal, log_w=log_w)
    checks.generator("generator", generator, log_proposal.device)
    checks.same_shape(log_proposal=log_proposal, log_w=log_w)
    if log_proposal.shape[-1] < 1:
        raise ValueError(f"log_proposal must have a support of N >= 1 outcomes, got shape {tuple(log_proposal.shape)}")
    checks.finite("log_proposal", log_proposal, allow_neg_inf=True)
    checks.finite("log_w", log_w, allow_neg_inf=True)
    if isinstance(ks, Tensor) and ks.dim() == 1 and not ks.is_floating_point():
        ks = ks.tolist()
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
        raise TypeError(f"ks must be a non-empty list of ints >= 1, got {ks!r}")
    ks = [checks.integer("ks", k, low=1) for k in ks]
    n_mc = checks.integer("n_mc", n_mc, low=1)
    shape, N, K = log_proposal.shape, log_proposal.shape[-1], max(ks)
    q = torch.softmax(log_proposal.reshape(-1, N), -1)  # [R, N], normalized
    if bool((q.sum(-1) == 0).any()) or torch.isnan(q).any():
        raise ValueError("log_proposal must put mass somewhere in every row")
    lw = log_w.reshape(-1, N).masked_fill(q == 0, float("-inf"))  # weights off the support are irrelevant
    top = lw.amax(-1, keepdim=True)  # [R, 1]
    if bool(torch.isneginf(top).any()):
        raise ValueError("log_w must be finite somewhere on the proposal's support in every row")
    lw = (lw - top).double()  # [R, N] log w <= 0; the law does not depend on the weights' scale
    R = lw.shape[0]
    if K > 1:  # in log space: weights spanning hundreds of nats neither overflow nor give 0 * inf
        idx = torch.multinomial(q, n_mc * (K - 1), replacement=True, generator=generator)  # [R, n_mc*(K-1)]
        log_sums = torch.logcumsumexp(lw.gather(1, idx).view(R, n_mc, K - 1), -1)  # [R, n_mc, K-1]: first j others
    out = []
    for k in ks:
        if k == 1:
            out.append(q.log().view(shape))
            continue
        log_denom = torch.logaddexp(lw[:, None, :], log_sums[..., k - 2, None])  # [R, n_mc, N] log(w(y) + S_{k-1})
        log_ratio = torch.where(torch.isneginf(log_denom), log_denom, math.log(k) - log_denom)
        log_mean = torch.logsumexp(log_ratio, 1) - math.log(n_mc)  # [R, N] log E[k / (w(y) + S_{k-1})]
        log_p = q.double().log() + lw + log_mean  # -inf where q or w is 0
        out.append((log_p - torch.logsumexp(log_p, -1, keepdim=True)).to(q.dtype).view(shape))
    return torch.stack(out)


def effective_sample_size(log_w: Tensor) -> Tensor:
    r"""ESS = (sum_i w_i)^2 / sum_i w_i^2 over the last dim: between 1 and k.

    Args:
        log_w: [..., k] log importance weights (``-inf`` allowed, not all of a row).

    Returns:
        [...] effective sample size (float32 for half-precision log weights).
    """
    checks.tensor("log_w", log_w, min_dims=1, floating=True)
    if log_w.shape[-1] < 1:
        raise ValueError(f"log_w must have a last dimension of k >= 1 weights, got shape {tuple(log_w.shape)}")
    checks.finite("log_w", log_w, allow_neg_inf=True)
    if bool(torch.isneginf(log_w).all(-1).any()):
        raise ValueError("log_w has a row whose weights are all zero (-inf): its ESS is undefined")
    return _ess(log_w)


def _ess(log_w: Tensor) -> Tensor:
    """:func:`effective_sample_size` without checks. For large log weights 2·log_w overflows (near
    3e38 in float32) or 2·logsumexp - logsumexp cancels: rows whose largest |log w| exceeds 64 use
    log w - max instead (no host sync; the other rows keep the bits of the plain formula)."""
    lw = log_w if log_w.dtype in (torch.float32, torch.float64) else log_w.float()
    ess = torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))
    top = lw.amax(-1, keepdim=True)  # finite: not every weight of a row is 0
    shifted = lw - top  # <= 0: 2·shifted cannot overflow
    safe = torch.exp(2 * torch.logsumexp(shifted, -1) - torch.logsumexp(2 * shifted, -1))
    return torch.where(torch.isfinite(ess) & (top.squeeze(-1).abs() <= 64), ess, safe)
