r"""The reward-KL frontier of the exact world, and the paths optimisers take against it.

For P prompts, each with its own policy over a finite support, the frontier is the least mean KL
that reaches a mean reward rho:

    F(rho) = min { mean_x KL(pi_x || pi_ref,x) : mean_x E_{pi_x}[r] >= rho }.                  (frontier)

Its Lagrangian is separable with one multiplier 1/beta' for all prompts, so the minimisers are
pi*_{beta'} ∝ pi_ref·exp(r/beta') with a *shared* beta' (:func:`frontier`, :func:`frontier_kl`);
F is 0 below mean E_ref[r] and tends to mean -log pi_ref(argmax r) as rho tends to mean max r.

Exact proximal ("mirror") steps on J_beta(pi) = E_pi[r] - beta·KL(pi || pi_ref) with an old anchor
of coefficient beta_s > 0 (GVPO with ``anchor="old"`` and coefficient beta_s, solved exactly, when
beta = 0):

    pi_{t+1} = argmax_pi E_pi[r] - beta·KL(pi || pi_ref) - beta_s·KL(pi || pi_t)
    log pi_{t+1} = (r + beta·log pi_ref + beta_s·log pi_t) / (beta + beta_s) - log Z_t.          (mirror)

(Maximise a strictly concave function on the simplex: the log of the maximiser is the bracket
divided by beta + beta_s, up to a constant.) From pi_0 = pi_ref, by induction pi_t = pi*_{1/c_t}
with c_0 = 0 and c_{t+1} = (1 + beta_s·c_t) / (beta + beta_s): every iterate is on the frontier,
c_t -> 1/beta (pi* of J_beta) for beta > 0, and c_t = t/beta_s for beta = 0 (:func:`mirror_path`).

Expected GVPO steps (:func:`expected_path`): :func:`refimpl.tabular.train_tabular` with the
gradient replaced by its expectation over the batch, -beta·mu ⊙ (s - E_mu s) per prompt with
s = r - beta·(log pi - log pi_anchor) (for any k >= 2 and sampler mu; :func:`refimpl.klpg.expected_gradient`).
On-policy with the reference anchor this is noiseless gradient ascent theta += lr·beta·∇J_beta,
which leaves the frontier: its path spends more KL than F at the same reward.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import checks, kl, klpg
from .tabular import TabularRun

__all__ = ["RewardKL", "reward_kl", "frontier", "frontier_kl", "MirrorPath", "mirror_path", "expected_path"]


class RewardKL(NamedTuple):
    """Points (mean reward, mean KL) of policies over P prompts, one per step or per beta'."""

    reward: Tensor  # [S] mean_x E_pi[r]
    kl: Tensor  # [S] mean_x KL(pi || pi_ref)


def _world(logp_ref: Tensor, reward: Tensor) -> None:
    checks.tensor("logp_ref", logp_ref, dims=2, floating=True)
    checks.tensor("reward", reward, dims=2, floating=True)
    checks.same_device(logp_ref=logp_ref, reward=reward)
    checks.same_shape(logp_ref=logp_ref, reward=reward)
    checks.nonempty("logp_ref", logp_ref)  # P >= 1 prompts, N >= 1 outcomes
    checks.finite("logp_ref", logp_ref, allow_neg_inf=True)
    checks.finite("reward", reward)
    if bool(torch.isneginf(logp_ref).all(-1).any()):
        raise ValueError("logp_ref has a row that is -inf everywhere: it puts no mass anywhere")


def _points(logp: Tensor, logp_ref: Tensor, reward: Tensor) -> RewardKL:
    """[S, P, N] log-policies -> RewardKL [S] (no checks)."""
    return RewardKL((logp.exp() * reward).sum(-1).mean(-1), kl.kl_divergence(logp, logp_ref).mean(-1))


def reward_kl(path: Sequence[Tensor] | Tensor, logp_ref: Tensor, reward: Tensor) -> RewardKL:
    """(mean E_pi[r], mean KL(pi || pi_ref)) of each log pi [P, N] of ``path`` (a list, or [S, P, N]).

    Args:
        path: log-policies, e.g. ``TabularRun.history`` or ``MirrorPath.logp``.
        logp_ref: [P, N] log pi_ref. reward: [P, N] r(x, y).
    """
    if not isinstance(path, Tensor):
        if isinstance(path, (str, bytes)) or not isinstance(path, Iterable):
            raise TypeError(f"path must be a [S, P, N] tensor or a list of [P, N] tensors, got {type(path).__name__}")
        path = list(path)
        for i, t in enumerate(path):  # devices first: the checks below read values
            checks.same_device(**{f"path[{i}]": t, "logp_ref": logp_ref})
            checks.same_shape(**{f"path[{i}]": t, "logp_ref": logp_ref})
        if not path:
            raise ValueError("path must hold at least one log-policy, got an empty list")
    else:
        checks.same_device(path=path, logp_ref=logp_ref)
    _world(logp_ref, reward)
    logp = torch.stack(path) if not isinstance(path, Tensor) else path
    checks.nonempty("path", checks.tensor("path", logp, dims=3, floating=True))
    if logp.shape[1:] != logp_ref.shape:
        raise ValueError(f"path must hold log-policies shaped like logp_ref {tuple(logp_ref.shape)}, "
                         f"got {tuple(logp.shape[1:])}")
    checks.finite("path", logp, allow_neg_inf=True)
    return _points(logp, logp_ref, reward)


def _tilt(logp_ref: Tensor, reward: Tensor, c: Tensor) -> Tensor:
    """log pi*_{1/c} [S, P, N] for inverse temperatures c [S] >= 0 (max reward subtracted first)."""
    on = ~torch.isneginf(logp_ref)
    r = reward - reward.masked_fill(~on, float("-inf")).amax(-1, keepdim=True)  # <= 0 on the support
    return torch.log_softmax(logp_ref + c[:, None, None] * r.masked_fill(~on, 0.0), -1)


def frontier(logp_ref: Tensor, reward: Tensor, betas: Sequence[float] | Tensor) -> RewardKL:
    """The frontier's points pi*_{beta'} for each beta' of ``betas`` (each > 0), eq. (frontier).

    Args:
        logp_ref: [P, N] log pi_ref. reward: [P, N]. betas: [S] the shared beta' of the prompts.
    """
    _world(logp_ref, reward)
    b = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    if b.numel() == 0 or not bool(torch.isfinite(b).all() & (b > 0).all()):
        raise ValueError("betas must hold at least one finite value, each > 0")
    c = (1 / b).to(device=logp_ref.device, dtype=torch.promote_types(logp_ref.dtype, reward.dtype))
    return _points(_tilt(logp_ref, reward, c), logp_ref, reward)


def frontier_kl(logp_ref: Tensor, reward: Tensor, target: Tensor | float) -> Tensor:
    r"""F(rho) of eq. (frontier) for each mean reward rho of ``target``: the least mean KL that reaches it.

    Bisection on log c, c = 1/beta' (mean E_{pi*_{1/c}}[r] rises with c: its derivative is a
    variance), over c in [e^-40, e^40]; 0 for rho <= mean E_ref[r], the limit mean -log pi_ref(argmax r)
    for rho >= mean max r (a reward no finite beta' reaches; above it, no policy does: a ValueError).

    Args:
        logp_ref: [P, N] log pi_ref. reward: [P, N]. target: [S] (or a number) mean rewards <= mean max r.

    Returns:
        [S] least mean KL, in the dtype of logp_ref (float64 recommended).
    """
    if isinstance(target, Tensor):
        checks.same_device(logp_ref=logp_ref, target=target)  # first: _world reads values
    elif isinstance(target, Real) and not isinstance(target, bool):
        target = checks.real("target", target)
    elif (isinstance(target, (str, bytes)) or not isinstance(target, Sequence)
          or not all(isinstance(v, Real) and not isinstance(v, bool) for v in target)):
        raise TypeError(f"target must be a number, a list of numbers or a tensor of mean rewards, got {target!r}")
    _world(logp_ref, reward)
    rho = torch.as_tensor(target, dtype=logp_ref.dtype, device=logp_ref.device).reshape(-1)
    checks.finite("target", checks.nonempty("target", rho))
    on = ~torch.isneginf(logp_ref)
    top = reward.masked_fill(~on, float("-inf")).amax(-1, keepdim=True)  # [P, 1]
    eps = max(torch.finfo(logp_ref.dtype).eps, torch.finfo(reward.dtype).eps)  # rounding of a mean reward near the top
    if bool((rho > top.mean() + 8 * reward.shape[-1] * eps * reward.abs().max()).any()):
        raise ValueError(f"target must be at most the mean maximal reward {top.mean().item():.6g} (no policy reaches "
                         f"more), got {rho.max().item():.6g}")
    at_top = on & (reward == top)
    limit = -torch.logsumexp(torch.log_softmax(logp_ref, -1).masked_fill(~at_top, float("-inf")), -1).mean()
    lo = torch.full_like(rho, -40.0)
    hi = torch.full_like(rho, 40.0)
    for _ in range(100):  # the bracket on log c shrinks to 80·2^-100
        mid = 0.5 * (lo + hi)
        low = _points(_tilt(logp_ref, reward, mid.exp()), logp_ref, reward).reward < rho
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    out = _points(_tilt(logp_ref, reward, hi.exp()), logp_ref, reward).kl
    base = _points(logp_ref.unsqueeze(0), logp_ref, reward).reward
    out = torch.where(rho <= base, torch.zeros_like(out), out)
    return torch.where(rho >= top.mean(), limit.expand_as(out), out)


class MirrorPath(NamedTuple):
    """Exact mirror steps (eq. mirror): log pi_t and the inverse temperature c_t with pi_t = pi*_{1/c_t}."""

    logp: Tensor  # [steps + 1, P, N] log pi_t, pi_0 = pi_ref
    inverse_beta: Tensor  # [steps + 1] c_t (c_0 = 0)


def mirror_path(logp_ref: Tensor, reward: Tensor, beta: float, step_beta: float, steps: int) -> MirrorPath:
    r"""Iterate eq. (mirror) ``steps`` times from pi_ref, in log space.

    Args:
        logp_ref: [P, N] log pi_ref. reward: [P, N].
        beta: the pull toward pi_ref, >= 0 (0: GVPO-old's step, pure reward with a trust region).
        step_beta: beta_s > 0, the pull toward the previous iterate (GVPO-old's beta).
        steps: >= 1.
    """
    _world(logp_ref, reward)
    beta = checks.beta(beta, allow_zero=True)
    step_beta = checks.beta(step_beta, "step_beta")
    steps = checks.integer("steps", steps, low=1)
    if not math.isfinite(beta + step_beta):
        raise ValueError(f"beta + step_beta overflows: {beta:g} + {step_beta:g}")
    lp_ref = torch.log_softmax(logp_ref, -1)
    off = torch.isneginf(lp_ref)
    r = reward - reward.masked_fill(off, float("-inf")).amax(-1, keepdim=True)  # <= 0 on support
    r = r.masked_fill(off, 0.0)
    pull = (beta * lp_ref).masked_fill(off, float("-inf"))  # -inf off the support (also at beta = 0)
    logp, c = [lp_ref], [0.0]
    for _ in range(steps):
        mixed = (r + pull + step_beta * logp[-1]) / (beta + step_beta)  # -inf off the support
        logp.append(torch.log_softmax(mixed, -1))
        c.append((1 + step_beta * c[-1]) / (beta + step_beta))
    out = torch.stack(logp)
    if not math.isfinite(c[-1]) or bool(torch.isnan(out).any() | torch.isposinf(out).any()):
        raise ValueError(f"mirror_path: the inverse temperature c_t overflows after {steps} steps at step_beta = "
                         f"{step_beta:g}, beta = {beta:g}: raise step_beta or take fewer steps")
    return MirrorPath(out, torch.tensor(c, dtype=torch.float64))


def expected_path(logp_ref: Tensor, reward: Tensor, beta: float, lr: float, steps: int, sampling: str = "policy",
                  anchor: str = "reference", anchor_every: int = 1) -> TabularRun:
    r""":func:`refimpl.tabular.train_tabular` for GVPO with each step's gradient replaced by its expectation.

    theta <- theta - lr·(-beta)·mu ⊙ (s - E_mu s), s = r - beta·(log pi_theta - log pi_anchor), from
    theta = log pi_ref; mu is pi_theta ("policy"), uniform, or pi_ref ("reference"); the "old"
    anchor is the policy at the last multiple of ``anchor_every`` steps. The same step size as
    ``train_tabular(..., RLConfig(beta=beta, lr=lr, ...))``: the difference between the two paths is
    sampling noise alone. Outcomes with pi_ref = 0 (``-inf``) keep probability 0, and "uniform" is
    uniform on the support of pi_ref. A step size whose path overflows raises a ValueError ("diverged").

    Returns:
        :class:`refimpl.tabular.TabularRun` (log pi after each step).
    """
    _world(logp_ref, reward)
    beta = checks.beta(beta)
    lr = checks.real("lr", lr, low=0.0, low_open=True)
    steps = checks.integer("steps", steps, low=1)
    checks.choice("sampling", sampling, ("policy", "uniform", "reference"))
    checks.choice("anchor", anchor, ("reference", "old"))
    anchor_every = checks.integer("anchor_every", anchor_every, low=1)
    if not math.isfinite(lr * beta):
        raise ValueError(f"lr * beta overflows: {lr:g} * {beta:g}")
    on = ~torch.isneginf(logp_ref)  # the support of pi_ref, and of every pi_theta
    full = bool(on.all())
    theta = logp_ref.detach().clone()
    if not full and theta.dtype in (torch.float16, torch.bfloat16):
        theta = theta.float()  # room below the support for _off_support's stand-in
    uniform = torch.zeros_like(logp_ref).masked_fill(~on, float("-inf"))  # uniform on the support
    history, start = [], None
    for step in range(steps):
        logp = torch.log_softmax(theta, -1)
        if step % anchor_every == 0:
            start = logp
        sampler = {"policy": None, "uniform": uniform, "reference": logp_ref}[sampling]
        anchor_logp = logp_ref if anchor == "reference" else start
        args = (theta, anchor_logp) if full else (_off_support(theta, on), _off_support(anchor_logp, on))
        try:
            grad = klpg.expected_gradient(*args, reward, beta, "k1_reward", logp_sampler=sampler, baseline="rloo")
        except ValueError as e:  # the inputs were checked: only the path itself can have overflowed
            raise ValueError(f"expected_path diverged at step {step} (pi_theta is not finite): lower lr") from e
        theta = theta - lr * beta * grad
        history.append(torch.log_softmax(theta, -1))
    if bool(torch.isnan(history[-1]).any() | torch.isposinf(history[-1]).any()):
        raise ValueError("expected_path diverged (the final pi_theta is not finite): lower lr")
    return TabularRun(history[-1], history)


def _off_support(x: Tensor, on: Tensor) -> Tensor:
    """x [P, N] with its entries off the support (``-inf``) replaced by a finite stand-in far enough below
    the rest of its row that its softmax weight underflows to exactly 0: the expected gradient there is
    exactly 0, and on the support it is the gradient of the policy restricted to the support."""
    lo = x.masked_fill(~on, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~on, float("-inf")).amax(-1, keepdim=True)
    return torch.where(on, x, lo - (hi - lo) - lo.abs() - 1e3)
