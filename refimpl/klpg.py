r"""KL-regularised policy gradient: what the KL penalty's gradient is, depending on how it is coded.

Objective: J(pi) = E_pi[r] - beta·KL(pi || pi_ref), maximised by pi* (:mod:`refimpl.kl`). On
samples y ~ pi_theta, with t = log pi_ref(y) - log pi_theta(y), three estimators of KL(pi||pi_ref)
(Schulman 2020, "Approximating KL divergence", blog post):

    k1 = -t,     k2 = ½ t²,     k3 = (e^t - 1) - t  (>= 0).                             (k1-k3)

E_pi[k1] = E_pi[k3] = KL exactly; E_pi[k2] = KL + O(abs(pi/pi_ref - 1)³) only. An implementation
does not only estimate the KL, it differentiates something. On-policy, per sample, the expected
gradients with respect to the logits theta are (the sampling is not differentiated; Tang & Munos
2025, "On a few pitfalls in KL divergence gradient estimation for RL", arXiv 2506.09477; Liu et
al. 2025, "Rethinking KL regularization in RLHF", arXiv 2510.01555):

* "k1_reward" (REINFORCE on the shaped reward r - beta·k1, detached):  -∇J, the true gradient;
* "k1_loss"   (-r·log pi + beta·k1, differentiated):  -∇E_pi[r], since E_pi[∇k1] = E_pi[∇ log pi] = 0;
* "k2_loss"   (-r·log pi + beta·k2):  -∇J as well: E_pi[t·∇t] = ∇KL(pi||pi_ref) exactly;
* "k3_loss"   (-r·log pi + beta·k3, GRPO's penalty):  -∇[E_pi r - beta·KL(pi_ref||pi)], the
  *forward* KL, since E_pi[(e^t - 1)∇t] = -sum_y pi_ref(y) ∇log pi(y).

So "k3 as a loss" converges to the forward-KL-regularised optimum, which (Lagrange conditions
of a convex problem on the simplex) is

    pi_fwd(y) = beta·pi_ref(y) / (lambda - r(y)),  lambda > max r the root of sum_y pi_fwd(y) = 1,   (fwd)

a rational, mass-covering tilt instead of pi*'s exponential one. The reward term uses the
leave-one-out baseline of RLOO (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
free!"; Ahmadian et al. 2024, "Back to basics: revisiting REINFORCE style optimization for
learning from human feedback in LLMs"), A_i = R_i - mean_{j≠i} R_j, unbiased because the
baseline of y_i does not depend on y_i. Everything here is sequence-level (one "token"; per-token
penalties: :mod:`refimpl.klest`). Off-policy (samples from any mu, no importance weights), k1 in
the reward with the RLOO baseline keeps pi* as its fixed point (eq. off-RLOO below): it is
GVPO-reference up to the factor beta. The
loss is the entry "kl_pg" of :data:`refimpl.rl.LOSSES`, so :func:`refimpl.tabular.train_tabular`
trains it exactly in the exact world and :func:`refimpl.rl.train` on a language model.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from .grpo import K3_CLAMP

__all__ = ["KLEstimates", "kl_estimators", "ESTIMATORS", "BASELINES", "rloo_advantages", "kl_pg_loss",
           "expected_gradient", "forward_kl_optimum"]

ESTIMATORS = ("k1_reward", "k1_loss", "k2_loss", "k3_loss")
BASELINES = ("rloo", "none")


class KLEstimates(NamedTuple):
    """Per-sample estimates of KL(pi_theta || pi_ref), each shaped like the inputs."""

    k1: Tensor  # -t = log pi - log pi_ref: unbiased, can be negative
    k2: Tensor  # ½ t²: biased (second-order accurate), >= 0
    k3: Tensor  # (e^t - 1) - t: unbiased, >= 0


def _pair(logp: Tensor, logp_ref: Tensor, min_dims: int = 0) -> None:
    checks.nonempty("logp", checks.tensor("logp", logp, min_dims=min_dims, floating=True))
    checks.tensor("logp_ref", logp_ref, floating=True)
    checks.same_device(logp=logp, logp_ref=logp_ref)
    checks.same_shape(logp=logp, logp_ref=logp_ref)
    checks.finite("logp", logp)
    checks.finite("logp_ref", logp_ref)


def kl_estimators(logp: Tensor, logp_ref: Tensor) -> KLEstimates:
    r"""k1 = -t, k2 = ½t², k3 = expm1(t) - t with t = log pi_ref(y) - log pi_theta(y)   (eq. k1-k3).

    Args:
        logp: [...] log pi_theta(y) of samples y ~ pi_theta (finite).
        logp_ref: [...] log pi_ref(y) of the same samples (finite).

    Returns:
        :class:`KLEstimates`, differentiable in both inputs.
    """
    _pair(logp, logp_ref)
    t = logp_ref - logp
    k3 = torch.expm1(t) - t
    if not bool(torch.isfinite(k3).all()):
        raise ValueError(f"k3 = exp(log pi_ref - log pi) - ... overflows {k3.dtype}: use float64 tensors")
    return KLEstimates(-t, 0.5 * t * t, k3)


def rloo_advantages(rewards: Tensor) -> Tensor:
    r"""A_i = R_i - 1/(k-1)·sum_{j≠i} R_j = k/(k-1)·(R_i - mean R), over each group (dim 1).

    Args:
        rewards: [P, k] rewards, k >= 2.

    Returns:
        [P, k] advantages, summing to zero in each group.
    """
    checks.tensor("rewards", rewards, dims=2, floating=True)
    checks.finite("rewards", rewards)
    if rewards.shape[1] < 2:
        raise ValueError(f"k (dim 1 of rewards) must be >= 2 for a leave-one-out baseline, got {rewards.shape[1]}")
    checks.nonempty("rewards", rewards)
    return _rloo(_safe(rewards))


def _safe(t: Tensor) -> Tensor:
    """Half-precision input in float32 (sums of rewards of 6e4 overflow float16); other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rloo(rewards: Tensor) -> Tensor:
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def _surrogate(logp: Tensor, logp_ref: Tensor, rewards: Tensor, beta: float, estimator: str, baseline: str) -> Tensor:
    """Per-sample loss terms [P, k] whose gradient the implementation follows (no checks)."""
    t = logp_ref - logp  # [P, k], carrying the graph through logp
    if estimator == "k1_reward":  # the penalty enters the reward, detached: REINFORCE on r - beta·k1
        shaped = rewards.detach() - beta * (-t).detach()
        adv = _rloo(shaped) if baseline == "rloo" else shaped
        return -adv * logp
    adv = (_rloo(rewards) if baseline == "rloo" else rewards).detach()
    if estimator == "k1_loss":
        penalty = -t
    elif estimator == "k2_loss":
        penalty = 0.5 * t * t
    else:  # k3, with the log-ratio clamped as in refimpl.grpo (verl) so exp stays finite
        tc = t.clamp(-K3_CLAMP, K3_CLAMP)
        penalty = torch.expm1(tc) - tc
    return -adv * logp + beta * penalty


def _options(beta, estimator, baseline) -> float:
    checks.choice("estimator", estimator, ESTIMATORS)
    checks.choice("baseline", baseline, BASELINES)
    return checks.beta(beta)


def kl_pg_loss(logp: Tensor, logp_ref: Tensor, rewards: Tensor, beta: float, estimator: str = "k1_reward",
               baseline: str = "rloo") -> Tensor:
    r"""Policy-gradient loss with a KL penalty, mean over the P·k samples.

    Per sample: "k1_reward": -A(r - beta·sg(k1))_i·log pi(y_i); otherwise
    -A(r)_i·log pi(y_i) + beta·k_i with k the estimator of ``estimator`` (eq. k1-k3), where A is
    the RLOO advantage (``baseline="rloo"``) or the reward itself (``"none"``).

    Args:
        logp: [P, k] sequence log pi_theta of on-policy samples, carrying the graph.
        logp_ref: [P, k] log pi_ref of the same samples.
        rewards: [P, k] rewards.
        beta: KL coefficient, > 0.
        estimator: one of :data:`ESTIMATORS`. baseline: one of :data:`BASELINES`.

    Returns:
        Scalar loss; its expected gradient is :func:`expected_gradient` / P.
    """
    beta = _options(beta, estimator, baseline)
    for name, t in (("logp", logp), ("logp_ref", logp_ref), ("rewards", rewards)):
        checks.tensor(name, t, dims=2, floating=True)
    checks.same_device(logp=logp, logp_ref=logp_ref, rewards=rewards)
    checks.same_shape(logp=logp, logp_ref=logp_ref, rewards=rewards)
    for name, t in (("logp", logp), ("logp_ref", logp_ref), ("rewards", rewards)):
        checks.finite(name, t)
    if logp.shape[1] < (2 if baseline == "rloo" else 1) or logp.shape[0] < 1:
        raise ValueError(f"logp must have shape [P >= 1, k >= {2 if baseline == 'rloo' else 1}] "
                         f"(RLOO needs k >= 2), got {tuple(logp.shape)}")
    return _surrogate(_safe(logp), _safe(logp_ref), _safe(rewards), beta, estimator, baseline).mean()


def expected_gradient(logits: Tensor, logp_ref: Tensor, reward: Tensor, beta: float, estimator: str,
                      logp_sampler: Tensor | None = None, baseline: str = "none") -> Tensor:
    r"""E_{y~mu}[∇_theta loss(y)] exactly, for a tabular policy pi_theta = softmax(logits).

    The per-sample loss is :func:`kl_pg_loss`'s, weighted by mu(y) held constant and summed over
    the support: the average of what an implementation differentiates. On-policy (mu = pi_theta,
    the default) a baseline does not change it, and the closed forms are -∇J for "k1_reward" and
    "k2_loss", -∇E_pi[r] for "k1_loss", -∇(E_pi[r] - beta·KL(pi_ref||pi)) for "k3_loss" (while every
    abs(log pi_ref - log pi) <= K3_CLAMP, beyond which the loss clamps it as GRPO does).

    Off-policy (any fixed sampler mu, no importance weights), with s = r - beta·(log pi - log pi_ref)
    the shaped reward of "k1_reward" and g(y) = e_y - pi the score of y:

        RLOO:  -E[∇loss] = E[A_i g(y_i)] = E_mu[(s - E_mu s)·g] = mu ⊙ (s - E_mu s),      (off-RLOO)
        none:  -E[∇loss] = E[s_i g(y_i)] = mu ⊙ s - (E_mu s)·pi.                          (off-none)

    (off-RLOO) vanishes exactly where s is constant on the support of mu, i.e. at pi* when mu has
    full support; GVPO-reference's expected gradient (per group) is beta times it. (off-none) vanishes at pi* only if
    mu = pi* (or log Z = 0): without a baseline, KL-PG off-policy has another fixed point.

    Args:
        logits: [..., N] finite logits theta.
        logp_ref: [..., N] log pi_ref (finite). reward: [..., N] r(y).
        beta: KL coefficient, > 0. estimator: one of :data:`ESTIMATORS`.
        logp_sampler: [..., N] log mu, the sampler (``-inf`` where it never samples); default pi_theta.
        baseline: one of :data:`BASELINES` (the expectation of RLOO for any k >= 2).

    Returns:
        [..., N] the expected gradient with respect to the logits (it sums to 0 over N).
    """
    beta = _options(beta, estimator, baseline)
    for name, t in (("logits", logits), ("logp_ref", logp_ref), ("reward", reward)):
        checks.nonempty(name, checks.tensor(name, t, min_dims=1, floating=True))
    checks.same_device(logits=logits, logp_ref=logp_ref, reward=reward, logp_sampler=logp_sampler)
    checks.same_shape(logits=logits, logp_ref=logp_ref, reward=reward)
    for name, t in (("logits", logits), ("logp_ref", logp_ref), ("reward", reward)):
        checks.finite(name, t)
    if logp_sampler is not None:
        checks.tensor("logp_sampler", logp_sampler, floating=True)
        checks.same_shape(logits=logits, logp_sampler=logp_sampler)
        checks.finite("logp_sampler", logp_sampler, allow_neg_inf=True)
        if bool(torch.isneginf(logp_sampler).all(-1).any()):
            raise ValueError("logp_sampler has a row that is -inf everywhere: it samples nothing")
    logits, logp_ref, reward = _safe(logits), _safe(logp_ref), _safe(reward)  # half precision: in float32
    with torch.enable_grad():
        theta = logits.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(theta, -1)  # [..., N]
        N = logp.shape[-1]
        mu = logp.detach().exp() if logp_sampler is None else torch.softmax(logp_sampler.detach(), -1)  # [..., N]
        reward = reward.detach()
        if baseline == "rloo":  # shifting r by -E_mu[s] makes _surrogate's advantage s - E_mu s (eq. off-RLOO)
            s = reward - beta * (logp.detach() - logp_ref) if estimator == "k1_reward" else reward
            reward = reward - (mu * s).sum(-1, keepdim=True)
        per = _surrogate(logp.reshape(-1, N), logp_ref.reshape(-1, N).detach(), reward.reshape(-1, N),
                         beta, estimator, "none")  # [R, N]: the loss of each outcome, as if sampled
        (grad,) = torch.autograd.grad((mu.reshape(-1, N) * per).sum(), theta)
    return grad


def forward_kl_optimum(logp_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    r"""log pi_fwd = argmax_pi E_pi[r] - beta·KL(pi_ref || pi): log pi_ref - log(u + (r_max - r)/beta)   (eq. fwd).

    With lambda = r_max + beta·u, u in [pi_ref(argmax r), 1] is found by bisection on log u
    (sum_y pi_fwd(y) decreases in u); r_max is the largest reward on the support of pi_ref.

    Args:
        logp_ref: [..., N] log pi_ref (``-inf`` where 0). reward: [..., N] finite r(y).
        beta: KL coefficient, > 0.

    Returns:
        [..., N] log pi_fwd, normalised (``-inf`` where pi_ref is 0).
    """
    beta = checks.beta(beta)
    checks.tensor("logp_ref", logp_ref, min_dims=1, floating=True)
    checks.tensor("reward", reward, floating=True)
    checks.same_device(logp_ref=logp_ref, reward=reward)
    checks.same_shape(logp_ref=logp_ref, reward=reward)
    checks.finite("logp_ref", logp_ref, allow_neg_inf=True)
    checks.finite("reward", reward)
    on = ~torch.isneginf(logp_ref)
    if bool((~on).all(-1).any()):
        raise ValueError("logp_ref has a row that is -inf everywhere: it puts no mass anywhere")
    lp = torch.log_softmax(logp_ref.double(), -1)  # [..., N]
    r = reward.double().masked_fill(~on, float("-inf"))
    gap = (r.amax(-1, keepdim=True) - r) / beta  # [..., N] >= 0 on the support, +inf off it
    lo = torch.logsumexp(lp.masked_fill(gap > 0, float("-inf")), -1, keepdim=True)  # log pi_ref(argmax): sum >= 1
    hi = torch.zeros_like(lo)  # log u = 0: sum <= 1
    for _ in range(80):  # bisection on log u; the bracket shrinks to 2^-80 of its width
        mid = 0.5 * (lo + hi)
        too_big = torch.logsumexp(lp - torch.log(mid.exp() + gap), -1, keepdim=True) > 0
        lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
    out = lp - torch.log(hi.exp() + gap)
    return torch.log_softmax(out, -1).to(torch.promote_types(logp_ref.dtype, torch.float32))
