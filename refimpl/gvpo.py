r"""GVPO (Zhang et al. 2025, "GVPO: Group Variance Policy Optimization", arXiv 2504.19599).

For each prompt, k >= 2 completions y_1..y_k drawn from any sampling distribution, sequence
log-probs summed over completion tokens, rho_i = log pi_theta(y_i) - log pi_anchor(y_i):

* weights   w_i = (R_i - mean R) - beta (rho_i - mean rho)                        (GVPO weights)
* loss      L = 1/(k-1) · ½ · sum_i [beta (rho_i - mean rho) - (R_i - mean R)]^2   (per prompt,
  averaged over prompts), whose gradient is -beta/(k-1) · sum_i w_i ∇ log pi_theta(y_i).

Its unique minimiser (for full-support sampling) is pi* = pi_anchor · exp(R/beta) / Z: the
implicit reward beta·rho + beta·log Z matches R up to a constant that centring removes.
Expanding the square, L = ½ Var(R) - beta Cov(R, rho) + ½ beta² Var(rho) (sample moments over the
group); :func:`gvpo_loss_terms` drops the covariance or the variance term for the paper's ablations.
The trainers of :mod:`refimpl.rl` choose the anchor: a fixed reference or the policy at the
start of each rollout, as the authors' code does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks

__all__ = ["gvpo_weights", "gvpo_loss", "gvpo_loss_terms", "check_groups", "token_mean_optimum"]


def check_groups(**tensors: Tensor) -> None:
    """Every tensor [P, k, ...] with the shape and device of the first, k >= 2, non-empty, floating and finite."""
    for name, t in tensors.items():
        checks.tensor(name, t, min_dims=2, floating=True)
    checks.same_device(**tensors)
    checks.same_shape(**tensors)
    for name, t in tensors.items():
        checks.nonempty(name, t)  # P = 0 (or T = 0) rows: a mean over nothing is NaN
    for name, t in tensors.items():
        checks.finite(name, t)
    first_name, first = next(iter(tensors.items()))
    if first.shape[1] < 2:
        raise ValueError(f"k (dim 1 of {first_name}) must be >= 2, got {first.shape[1]}: "
                         "a group of one has no group mean to centre on")


def _centre(x: Tensor) -> Tensor:
    """x - mean over the group (dim 1)."""
    return x - x.mean(dim=1, keepdim=True)


def _wide(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Half-precision tensors in float32 (differences and squares of log-probs and rewards overflow
    float16 at 6e4); float32 and float64 ones unchanged."""
    return tuple(t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors)


def _fits(name: str, out: Tensor) -> Tensor:
    """``out``, or a clear error when the true result does not fit its dtype (rewards of 1e30 in float32)."""
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} overflows {out.dtype}: rescale the rewards or beta, or pass float64 tensors")
    return out


def gvpo_weights(logp: Tensor, logp_anchor: Tensor, rewards: Tensor, beta: float) -> Tensor:
    r"""w_i = (R_i - mean R) - beta (rho_i - mean rho), rho = log pi_theta - log pi_anchor.

    Args:
        logp: [P, k] sequence log pi_theta(y_i | x) (summed over completion tokens).
        logp_anchor: [P, k] sequence log pi_anchor(y_i | x).
        rewards: [P, k] R(x, y_i).
        beta: KL coefficient, > 0.

    Returns:
        [P, k] detached weights (float32 for half-precision input); they sum to zero in each group
        and vanish at pi*.
    """
    beta = checks.beta(beta)
    check_groups(logp=logp, logp_anchor=logp_anchor, rewards=rewards)
    logp, logp_anchor, rewards = _wide(logp, logp_anchor, rewards)
    rho = (logp - logp_anchor).detach()  # [P, k]
    return _fits("the weights", _centre(rewards) - beta * _centre(rho))


def _gvpo_loss(logp: Tensor, logp_anchor: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """:func:`gvpo_loss` without checks (for training loops)."""
    logp, logp_anchor, rewards = _wide(logp, logp_anchor, rewards)
    k = logp.shape[1]
    rho = logp - logp_anchor.detach()  # [P, k]
    residual = beta * _centre(rho) - _centre(rewards)  # [P, k]
    return (0.5 * residual.pow(2).sum(dim=1) / (k - 1)).mean()


def gvpo_loss(logp: Tensor, logp_anchor: Tensor, rewards: Tensor, beta: float) -> Tensor:
    r"""L = mean_prompts 1/(k-1) · ½ · sum_i [beta (rho_i - mean rho) - (R_i - mean R)]^2.

    The MSE between the centred implicit reward beta·rho and the centred reward; its gradient is
    -beta/(k-1) · sum_i w_i ∇ log pi_theta(y_i) / P with w from :func:`gvpo_weights`.

    Args:
        logp: [P, k] sequence log pi_theta, carrying the graph.
        logp_anchor: [P, k] sequence log pi_anchor (treated as a constant).
        rewards: [P, k] rewards.
        beta: KL coefficient, > 0.

    Returns:
        Scalar loss, >= 0, zero exactly when beta·rho - R is constant in every group (float32 for
        half-precision input; a loss too large for the dtype raises ``ValueError``).
    """
    beta = checks.beta(beta)
    check_groups(logp=logp, logp_anchor=logp_anchor, rewards=rewards)
    return _fits("the loss", _gvpo_loss(logp, logp_anchor, rewards, beta))


def gvpo_loss_terms(logp: Tensor, logp_anchor: Tensor, rewards: Tensor, beta: float,
                    covariance: bool = True, variance: bool = True) -> Tensor:
    r"""-beta Cov(R, rho) + ½ beta² Var(rho), with either term switchable (the paper's ablations).

    Both on, this is :func:`gvpo_loss` minus the constant ½ Var(R) (same gradient). The
    covariance term alone is policy gradient with a group-mean baseline; the variance term alone
    pulls the group's log-ratios together and carries no reward. Sample moments use 1/(k-1).

    Args:
        logp, logp_anchor, rewards: [P, k] as in :func:`gvpo_loss`.
        beta: KL coefficient, > 0.
        covariance, variance: keep the term.

    Returns:
        Scalar loss (mean over prompts).
    """
    beta = checks.beta(beta)
    check_groups(logp=logp, logp_anchor=logp_anchor, rewards=rewards)
    covariance, variance = checks.boolean("covariance", covariance), checks.boolean("variance", variance)
    if not (covariance or variance):
        raise ValueError("covariance and variance cannot both be False: nothing would be left")
    logp, logp_anchor, rewards = _wide(logp, logp_anchor, rewards)
    k = logp.shape[1]
    rho = _centre(logp - logp_anchor.detach())  # [P, k]
    loss = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    if covariance:
        loss = loss - beta * (_centre(rewards) * rho).sum(1) / (k - 1)
    if variance:
        beta2 = beta**2 if beta < 1e150 else float("inf")  # (a Python float's ** raises on overflow)
        loss = loss + 0.5 * beta2 * rho.pow(2).sum(1) / (k - 1)
    return _fits("the loss", loss.mean())


def token_mean_optimum(logp_ref: Tensor, reward: Tensor, lengths: Tensor, beta: float) -> Tensor:
    r"""Where GVPO stops when rho is the token mean rho(y)/L(y) instead of the sum (finite support).

    The loss is zero exactly when beta·rho(y)/L(y) - R(y) is the same for every y of a prompt, so

        log pi(y) = log pi_ref(y) + L(y)·(R(y) + c)/beta,   c such that sum_y pi(y) = 1:     (tm)

    a tilt of strength L(y)/beta, stronger on long completions. With every length equal to L it is
    the optimum pi* at beta/L, not at beta; it is pi* only when every L(y) = 1. The log-normaliser of
    (tm) increases in c and changes sign on [-max R, -min R]; c is found there by bisection.

    Args:
        logp_ref: [P, N] log pi_ref (-inf off its support; normalised here).
        reward: [P, N] finite R(x, y).
        lengths: [P, N] integer completion lengths L(y) >= 1.
        beta: KL coefficient, > 0.

    Returns:
        [P, N] log pi of (tm), float64.
    """
    beta = checks.beta(beta)
    checks.tensor("logp_ref", logp_ref, dims=2, floating=True)
    checks.tensor("reward", reward, dims=2, floating=True)
    checks.same_shape(logp_ref=logp_ref, reward=reward)
    checks.same_device(logp_ref=logp_ref, reward=reward)
    checks.lengths("lengths", lengths, like=logp_ref)
    checks.nonempty("logp_ref", logp_ref)
    checks.finite("logp_ref", logp_ref, allow_neg_inf=True)
    checks.finite("reward", reward)
    if bool(torch.isneginf(logp_ref).all(-1).any()):
        raise ValueError("logp_ref has a row that is -inf everywhere: pi_ref puts no mass anywhere")
    lp, r, n = torch.log_softmax(logp_ref.double(), -1), reward.double(), lengths.double()
    tilted = lambda c: lp + n * (r + c) / beta  # noqa: E731  # [P, N] unnormalised log pi of (tm)
    lo, hi = -r.amax(-1, keepdim=True), -r.amin(-1, keepdim=True)  # [P, 1]: log-normaliser <= 0 at lo, >= 0 at hi
    for _ in range(200):  # the bracket halves each time: 200 halvings reach float64's resolution
        mid = 0.5 * (lo + hi)
        above = torch.logsumexp(tilted(mid), -1, keepdim=True) > 0
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    out = tilted(0.5 * (lo + hi))
    return out - torch.logsumexp(out, -1, keepdim=True)
