r"""Best-of-n and rejection sampling: two exact samplers built from draws of pi_ref.

* **Best-of-n** draws y_1..y_n i.i.d. from pi and keeps the one with the highest score, ties
  broken uniformly at random among the tied draws. Its law (Beirami et al. 2024, "Theoretical
  guarantees on the best-of-n alignment policy", the PMF of Sec. 2) over a finite support is

      P_n(y) = pi(y) / pi(C(y)) · [F(s_y)^n - F^-(s_y)^n],                               (BoN)

  with C(y) = {y' : s_y' = s_y} the tie class of y, F(s) = pi(score <= s) and
  F^-(s) = pi(score < s): the maximum score is s_y with probability F^n - F^-^n, and the draw
  kept among those reaching it is distributed as pi restricted to the class. Without ties it is
  F(s_y)^n - F^-(s_y)^n. Its KL to pi obeys (their Theorem 3.1)

      KL(P_n || pi) <= log n - (n - 1)/n,                                                (bound)

  the value the literature long took as exact: it is attained only in the continuous limit (no
  atom of pi carries mass); ties only lower the KL (it is the KL between the laws of the tie
  classes). On a finite support it also saturates: KL(P_n || pi) -> -log pi(C_top) as n grows.
  :func:`refimpl.resample.resampling_law` with log_w = score/beta is the soft version: as
  beta -> 0 it tends to (BoN), with the same uniform tie rule.
* **Rejection sampling** for pi* = pi_ref·exp(r/beta)/Z with r <= r_max on the support of pi_ref
  (von Neumann 1951): propose y ~ pi_ref, accept with probability exp((r(y) - r_max)/beta) <= 1.
  Accepted draws are exact samples of pi*; the acceptance rate is

      a = E_ref[exp((r - r_max)/beta)] = Z·exp(-r_max/beta),                            (accept)

  so the expected number of proposals per sample is 1/a = exp(r_max/beta)/Z. Capped at n proposals,
  returning the last one when none is accepted, it samples

      R_n(y) = (1 - (1 - a)^n)·pi*(y) + (1 - a)^(n-1)·pi_ref(y)·(1 - e^{(r(y) - r_max)/beta}),        (capped)

  whose distance to pi* falls geometrically, like (1 - a)^n.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks

__all__ = ["best_of_n_law", "best_of_n_kl_bound", "rejection_acceptance", "rejection_law", "rejection_sample",
           "RejectionSamples"]


def _support(name: str, logp: Tensor, scores_name: str, scores: Tensor) -> None:
    """logp [..., N] floating, finite or -inf, mass in every row; scores [..., N] the same shape and
    device (finite; ``-inf`` allowed for a reward: a forbidden outcome)."""
    checks.tensor(name, logp, min_dims=1, floating=True)
    checks.tensor(scores_name, scores, min_dims=1, floating=True)
    checks.same_device(**{name: logp, scores_name: scores})
    checks.same_shape(**{name: logp, scores_name: scores})
    if logp.shape[-1] < 1:
        raise ValueError(f"{name} must have a support of N >= 1 outcomes, got shape {tuple(logp.shape)}")
    checks.finite(name, logp, allow_neg_inf=True)
    checks.finite(scores_name, scores, allow_neg_inf=scores_name == "reward")
    if bool(torch.isneginf(logp).all(-1).any()):
        raise ValueError(f"{name} has a row that is -inf everywhere: it puts no mass anywhere")


def best_of_n_law(logp: Tensor, scores: Tensor, n: int) -> Tensor:
    r"""log P_n(y) = log pi(y) - log pi(C(y)) + log[F(s_y)^n - F^-(s_y)^n]   (eq. BoN).

    The exact law of the draw kept by best-of-n: the highest score among n i.i.d. draws from pi,
    ties broken uniformly at random among the tied draws (so tied outcomes share their class's
    mass in proportion to pi). Computed in O(N log N) by sorting the scores, in log space:
    n·log F + log(1 - (1 - pi(C)/F)^n) via log1p/expm1, accurate for large n and tiny classes.
    Outcomes with pi(y) = 0 get -inf.

    Args:
        logp: [..., N] log pi over a finite support (renormalised here; ``-inf`` where pi is 0).
        scores: [..., N] finite scores s(y) (the reward).
        n: number of draws, >= 1 (n = 1 returns pi).

    Returns:
        [..., N] log P_n, normalised on the last dim, in logp's dtype (float32 at least).
    """
    _support("logp", logp, "scores", scores)
    n = checks.integer("n", n, low=1)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    shape, N = logp.shape, logp.shape[-1]
    logp = torch.log_softmax(logp.to(dtype), -1).reshape(-1, N)  # [R, N]
    s = scores.to(torch.promote_types(scores.dtype, torch.float32)).reshape(-1, N)  # [R, N]
    s_sorted, order = s.sort(-1)  # ascending scores
    lp_sorted = logp.gather(-1, order)  # [R, N]
    log_cdf = torch.logcumsumexp(lp_sorted, -1)  # [R, N] log pi(score <= s_(j)) at each sorted position j
    last = torch.searchsorted(s_sorted.contiguous(), s.contiguous(), right=True) - 1  # [R, N] last j with s_(j) <= s_y
    log_F = log_cdf.gather(-1, last)  # [R, N] log F(s_y)
    new = torch.ones_like(s_sorted, dtype=torch.bool)
    new[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
    group = new.long().cumsum(-1) - 1  # [R, N] tie class of each sorted position
    gmax = torch.full_like(lp_sorted, float("-inf")).scatter_reduce(-1, group, lp_sorted, "amax")  # [R, N] per class
    gmax = torch.where(torch.isneginf(gmax), torch.zeros_like(gmax), gmax)
    gsum = torch.zeros_like(lp_sorted).scatter_add(-1, group, torch.exp(lp_sorted - gmax.gather(-1, group)))
    log_class = (gsum.log() + gmax).gather(-1, group.gather(-1, last))  # [R, N] log pi(C(y)), summed directly
    # log[F^n - F^-^n] = n log F + log(1 - (1 - pi(C)/F)^n), with F^- = F - pi(C) never formed (no cancellation)
    gap = n * torch.log1p(-torch.exp((log_class - log_F).clamp(max=0.0)))  # [R, N] n log(F^-/F) in [-inf, 0]
    on = ~torch.isneginf(logp) & ~torch.isneginf(log_class)  # pi(y) > 0 (pi(C(y)) underflowing: P_n(y) ~ 0)
    out = logp - log_class + n * log_F + torch.log(-torch.expm1(gap))
    out = torch.where(on, out, torch.full_like(out, float("-inf")))
    return (out - torch.logsumexp(out, -1, keepdim=True)).reshape(shape)  # exact up to rounding; renormalised


def best_of_n_kl_bound(n: int) -> float:
    r"""log n - (n - 1)/n: the upper bound on KL(P_n || pi) (eq. bound; Beirami et al. 2024, Thm 3.1).

    It is the exact KL when the score has a continuous law under pi (the "analytical formula"
    of Stiennon et al. 2020), and strictly larger on a finite support.

    Args:
        n: number of draws, >= 1.

    Returns:
        The bound, a float >= 0 (0 at n = 1).
    """
    n = checks.integer("n", n, low=1)
    return math.log(n) - (n - 1) / n


def _log_accept(logp_ref: Tensor, reward: Tensor, beta: float, r_max) -> tuple[Tensor, Tensor]:
    """Checked (log pi_ref [..., N], log acceptance probability per outcome (r - r_max)/beta [..., N])."""
    if isinstance(r_max, Tensor) and isinstance(reward, Tensor):
        checks.same_device(reward=reward, r_max=r_max)  # before _support reads values
    _support("logp_ref", logp_ref, "reward", reward)
    beta = checks.beta(beta)
    if isinstance(r_max, Tensor):
        checks.tensor("r_max", r_max, floating=True)
        checks.finite("r_max", r_max)
        if r_max.dim() > reward.dim() - 1:
            raise ValueError(f"r_max must be a number or have the leading shape {tuple(reward.shape[:-1])} of "
                             f"reward (one bound per row), got shape {tuple(r_max.shape)}")
        try:
            r_max = r_max.to(reward.dtype).expand(reward.shape[:-1]).unsqueeze(-1)  # [..., 1]
        except RuntimeError:
            raise ValueError(f"r_max has shape {tuple(r_max.shape)}, which does not broadcast to the rows "
                             f"{tuple(reward.shape[:-1])} of reward") from None
    else:
        r_max = checks.real("r_max", r_max)
    on = ~torch.isneginf(logp_ref)
    if bool((on & (reward > r_max)).any()):
        raise ValueError("reward exceeds r_max on the support of logp_ref: rejection sampling needs r <= r_max "
                         "(an acceptance probability exp((r - r_max)/beta) above 1)")
    dtype = torch.promote_types(logp_ref.dtype, torch.float32)
    log_a = ((reward - r_max) / beta).to(dtype)  # [..., N] <= 0 on the support: exp cannot overflow
    return torch.log_softmax(logp_ref.to(dtype), -1), torch.where(on, log_a, torch.full_like(log_a, float("-inf")))


def rejection_acceptance(logp_ref: Tensor, reward: Tensor, beta: float, r_max: float | Tensor) -> Tensor:
    r"""a = E_{y~pi_ref}[exp((r(y) - r_max)/beta)] = Z·exp(-r_max/beta)   (eq. accept).

    Args:
        logp_ref: [..., N] log pi_ref (``-inf`` where pi_ref is 0).
        reward: [..., N] r(y), <= r_max wherever pi_ref > 0 (``-inf``: a forbidden outcome).
        beta: KL coefficient, > 0.
        r_max: the bound on r, a number or a [...] tensor (one bound per row, on reward's device).

    Returns:
        [...] acceptance probability per proposal, in [0, 1] (it underflows to 0 when r_max/beta is huge).
    """
    logp_ref, log_a = _log_accept(logp_ref, reward, beta, r_max)
    return torch.logsumexp(logp_ref + log_a, -1).exp()


def rejection_law(logp_ref: Tensor, reward: Tensor, beta: float, r_max: float | Tensor, n: int) -> Tensor:
    r"""log R_n: the law of rejection sampling capped at n proposals (the last one kept if all fail)   (eq. capped).

    Args:
        logp_ref, reward, beta, r_max: as in :func:`rejection_acceptance`.
        n: the cap on proposals, >= 1 (n = 1 returns pi_ref; n -> inf tends to pi*).

    Returns:
        [..., N] log R_n, normalised (float32 at least).
    """
    logp_ref, log_a = _log_accept(logp_ref, reward, beta, r_max)
    n = checks.integer("n", n, low=1)
    if n == 1:
        return logp_ref
    log_rate = torch.logsumexp(logp_ref + log_a, -1, keepdim=True)  # [..., 1] log a
    log_miss = torch.log1p(-log_rate.exp().clamp(max=1.0))  # log(1 - a); -inf when every proposal is accepted
    accepted = torch.log(-torch.expm1(n * log_miss)) + logp_ref + log_a - log_rate  # (1 - (1-a)^n) pi*
    rejected = (n - 1) * log_miss + logp_ref + torch.log1p(-log_a.exp().clamp(max=1.0))  # (1-a)^(n-1) pi_ref (1 - acc)
    out = torch.logaddexp(accepted, rejected)
    return out - torch.logsumexp(out, -1, keepdim=True)


class RejectionSamples(NamedTuple):
    """Exact draws of pi* and what they cost."""

    index: Tensor  # [..., n] long: the accepted outcomes, in the order they were accepted
    proposals: Tensor  # [...] long: draws from pi_ref used, up to and including the n-th acceptance


def rejection_sample(logp_ref: Tensor, reward: Tensor, beta: float, r_max: float | Tensor, n: int,
                     generator: torch.Generator | None = None, max_proposals: int = 10**8) -> RejectionSamples:
    r"""n exact samples of pi* = pi_ref·exp(r/beta)/Z per row by rejection from pi_ref.

    Proposals y ~ pi_ref are accepted with probability exp((r(y) - r_max)/beta); they are drawn
    in vectorised rounds sized from the exact acceptance rate a (eq. accept), and the count of
    proposals stops at the n-th acceptance of each row, as a sequential sampler would.

    Args:
        logp_ref, reward, beta, r_max: as in :func:`rejection_acceptance`.
        n: samples per row, >= 1.
        generator: for reproducible draws (on the tensors' device).
        max_proposals: refuse (ValueError) when the expected n/a proposals of a row exceed it.

    Returns:
        :class:`RejectionSamples`.
    """
    logp_ref, log_a = _log_accept(logp_ref, reward, beta, r_max)
    n = checks.integer("n", n, low=1)
    max_proposals = checks.integer("max_proposals", max_proposals, low=1)
    checks.generator("generator", generator, logp_ref.device)
    shape, N = logp_ref.shape[:-1], logp_ref.shape[-1]
    q = logp_ref.reshape(-1, N).exp()  # [R, N]
    accept = log_a.reshape(-1, N).exp()  # [R, N] acceptance probability per outcome
    rate = (q * accept).sum(-1)  # [R]
    worst = float(rate.min())
    if worst <= 0 or n / worst > max_proposals:
        raise ValueError(f"the acceptance rate is {worst:.3g}: {n} samples would need about n/a proposals "
                         f"> max_proposals={max_proposals}; lower r_max or raise beta")
    R, dev = q.shape[0], q.device
    index = torch.full((R, n), -1, dtype=torch.long, device=dev)  # [R, n]
    have = torch.zeros(R, dtype=torch.long, device=dev)  # accepted so far per row
    used = torch.zeros(R, dtype=torch.long, device=dev)  # proposals so far per row
    rows = torch.arange(R, device=dev).unsqueeze(1)  # [R, 1]
    while bool((have < n).any()):
        need = int((n - have).max())
        m = min(max(int(1.2 * need / worst) + 16, 16), max(2**22 // R, 64))  # proposals per row this round
        y = torch.multinomial(q, m, replacement=True, generator=generator)  # [R, m]
        u = torch.rand(R, m, generator=generator, dtype=accept.dtype, device=dev)
        ok = u < accept[rows, y]  # [R, m]
        rank = have.unsqueeze(1) + ok.long().cumsum(1)  # [R, m]: acceptances so far, through each proposal
        keep = ok & (rank <= n)
        index[rows.expand(R, m)[keep], rank[keep] - 1] = y[keep]
        done_at = torch.where(rank >= n, torch.arange(1, m + 1, device=dev), m + 1).amin(1)  # [R]
        used += torch.where(have < n, torch.clamp(done_at, max=m), torch.zeros_like(used))
        have = torch.clamp(rank[:, -1], max=n)
    return RejectionSamples(index.reshape(*shape, n), used.reshape(shape))
