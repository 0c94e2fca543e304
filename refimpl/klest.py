r"""Per-token KL estimators: what the trainers penalise, which gradient that is, where it stops.

A completion is a sequence y = (y_1..y_T); per token, t_tau = log pi_ref(y_tau | y_<tau) -
log pi_theta(y_tau | y_<tau), and the sequence log-ratio is t = sum_tau t_tau. The penalties
(Schulman 2020, "Approximating KL divergence"), applied to t_tau ("token") or to t ("sequence"):

    k1 = -t,   k2 = ½t²,   k3 = e^t - 1 - t,
    k3_corrected = k3·pi_theta/pi_old          (TRL >= 1.16, ``use_bias_correction_kl=True``, the default),
    low_var_kl = clamp(k3, -10, 10)            (verl's ``kl_penalty(..., "low_var_kl")``),   (k)

with the log-ratio inside k3 clamped to [-20, 20] (as verl does; ``grpo.K3_CLAMP``), and the ratio's
denominator pi_old held constant (on-policy it equals pi_theta: value 1, gradient ∇log pi_theta).
Each is used two ways (the sampling is never differentiated; A is the RLOO advantage or the reward):

* "reward": REINFORCE on the shaped reward r - beta·sg(sum k), per sample -A(r - beta·sg(k))·log pi(y);
* "loss":   -A(r)·log pi(y) + beta·sum k, the penalty differentiated (TRL's GRPOTrainer, verl's
  ``use_kl_loss``; their token means divide both terms by T alike, a rescaling of the step).

On-policy, the expected penalty gradients (derivations: E_pi[∇k1] = 0, E_pi[t∇t] = ∇KL,
E_pi[(e^t - 1)∇t] = -sum_y pi_ref ∇log pi; Tang & Munos 2025, arXiv 2506.09477) are::

    k1 in the reward (token or sequence): ∇KL(pi||pi_ref), the sequence's reverse KL -> pi*;
    k1 as a loss: 0 (no regularisation at all);
    k2 as a loss, k3_corrected as a loss: sequence: ∇KL(pi||pi_ref) -> pi*; token:
        sum_h pi(h)·∇KL(pi(.|h) || pi_ref(.|h)) with the law pi(h) of the prefix h held fixed;   (tok-rev)
    k3 / low_var_kl as a loss: the same with the forward KL(pi_ref(.|h) || pi(.|h)) (sequence: KL(pi_ref||pi));
    k3 in the reward (sequence): ∇KL(pi||pi_ref) - ∇KL(pi_ref||pi): ascent on E r - beta·[KL(pi||pi_ref) -
        KL(pi_ref||pi)], unbounded above (pi -> 0 anywhere): no maximiser; exact ascent keeps the mass on a few
        sequences and drives the rest to 0, a stationary point on the boundary (so do k2 and low_var_kl in the
        reward; per token, a single sequence), not pi*.
    These fixed points assume advantages that are only centred: dividing the reward's advantage by the group's
    std (GRPO) and not the penalty moves them to those of the coefficient beta·sigma_pi(r|x), per prompt.

(tok-rev) misses the score-function term through the prefixes, so training stops where, at every
prefix, pi(y|h) ∝ pi_ref(y|h)·exp(Q^pi(h, y)/beta) with Q^pi(h, y) = E_pi[r | h, y] the plain
expected reward, instead of pi*'s soft value beta·log E_ref[exp(r/beta) | h, y]: :func:`fixed_point`
solves both by backward induction. The exact world here is every sequence over a vocabulary of
V tokens and length T, a table of logits per prefix; :func:`expected_gradient` is exact, and
:func:`ascent` follows it. On a language model: ``RLConfig(loss="kl_pg", kl_level="token")``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks, kl, klpg
from .grpo import K3_CLAMP

__all__ = ["PENALTIES", "USAGES", "ESTIMATORS", "LEVELS", "LOW_VAR_KL_CLAMP", "MAX_SEQUENCES", "kl_penalty", "penalized_pg_loss",
           "SequenceWorld", "sequence_world", "token_logp", "fixed_point", "expected_gradient", "Ascent", "ascent"]

PENALTIES = ("k1", "k2", "k3", "k3_corrected", "low_var_kl")
USAGES = ("reward", "loss")
ESTIMATORS = tuple(f"{p}_{u}" for p in PENALTIES for u in USAGES)  # "k1_reward", "k1_loss", ..., "low_var_kl_loss"
LEVELS = ("sequence", "token")
LOW_VAR_KL_CLAMP = 10.0  # verl clamps the value of low_var_kl to [-10, 10]
MAX_SEQUENCES = 10**6  # sequence_world enumerates vocab**length sequences: at most this many


def _penalty(logp: Tensor, logp_old: Tensor, logp_ref: Tensor, penalty: str) -> Tensor:
    """Elementwise penalty (eq. k), differentiable in logp (no checks)."""
    t = logp_ref - logp
    if penalty == "k1":
        return -t
    if penalty == "k2":
        return 0.5 * t * t
    tc = t.clamp(-K3_CLAMP, K3_CLAMP)
    k3 = torch.expm1(tc) - tc
    if penalty == "k3":
        return k3
    if penalty == "k3_corrected":  # TRL: per_token_kl * coef_1, coef_1 = exp(logp - old_logp)
        return k3 * torch.exp((logp - logp_old.detach()).clamp(max=K3_CLAMP))
    return k3.clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def kl_penalty(logp: Tensor, logp_ref: Tensor, penalty: str, logp_old: Tensor | None = None) -> Tensor:
    r"""The penalty of eq. (k) per element: k1, k2, k3, k3·pi_theta/pi_old or verl's low_var_kl.

    Args:
        logp: [...] log pi_theta (per token or per sequence), finite, carrying the graph.
        logp_ref: [...] log pi_ref of the same tokens. penalty: one of :data:`PENALTIES`.
        logp_old: [...] log pi_old, the ratio's constant denominator ("k3_corrected"); default
            ``logp`` detached (on-policy: the ratio is 1 in value, ∇log pi_theta in gradient).

    Returns:
        [...] penalties, differentiable in ``logp`` (float32 for half-precision input).
    """
    checks.choice("penalty", penalty, PENALTIES)
    logp_old = logp.detach() if logp_old is None else logp_old
    for name, t in (("logp", logp), ("logp_ref", logp_ref), ("logp_old", logp_old)):
        checks.nonempty(name, checks.tensor(name, t, floating=True))
    checks.same_device(logp=logp, logp_ref=logp_ref, logp_old=logp_old)
    checks.same_shape(logp=logp, logp_ref=logp_ref, logp_old=logp_old)
    for name, t in (("logp", logp), ("logp_ref", logp_ref), ("logp_old", logp_old)):
        checks.finite(name, t)
    out = _penalty(klpg._safe(logp), klpg._safe(logp_old), klpg._safe(logp_ref), penalty)  # half: in float32
    return checks.fits("the penalty", out, "the log-ratios are too large: pass float64 tensors")


def _surrogate(logp_tok: Tensor, old_tok: Tensor, ref_tok: Tensor, mask: Tensor, rewards: Tensor, beta: float,
               estimator: str, level: str, baseline: str) -> Tensor:
    """Per-sample loss terms [P, k] whose gradient an implementation follows (no checks)."""
    penalty, usage = estimator.rsplit("_", 1)
    lp = (logp_tok * mask).sum(-1)  # [P, k] sequence log pi_theta
    if level == "sequence":
        k = _penalty(lp, (old_tok * mask).sum(-1), (ref_tok * mask).sum(-1), penalty)  # [P, k]
    else:
        k = (_penalty(logp_tok, old_tok, ref_tok, penalty) * mask).sum(-1)  # [P, k] summed over real tokens
    if usage == "reward":
        shaped = rewards.detach() - beta * k.detach()
        return -(klpg._rloo(shaped) if baseline == "rloo" else shaped) * lp
    adv = (klpg._rloo(rewards) if baseline == "rloo" else rewards).detach()
    return -adv * lp + beta * k


def penalized_pg_loss(logp_tok: Tensor, ref_tok: Tensor, mask: Tensor, rewards: Tensor, beta: float, estimator: str,
                      level: str = "token", baseline: str = "rloo", old_tok: Tensor | None = None) -> Tensor:
    r"""Policy gradient with a KL penalty coded as ``estimator`` at ``level``, mean over the P·k samples.

    Per sample, with lp = sum_tau log pi(y_tau | y_<tau) and K the penalty summed over the real tokens
    ("token") or taken of the sequence log-ratio ("sequence"): "<penalty>_reward":
    -A(r - beta·sg(K))·lp; "<penalty>_loss": -A(r)·lp + beta·K. At level "sequence" the four
    estimators of :data:`refimpl.klpg.ESTIMATORS` are :func:`refimpl.klpg.kl_pg_loss` exactly.

    Args:
        logp_tok: [P, k, T] log pi_theta per token, carrying the graph. ref_tok: [P, k, T] log pi_ref.
        mask: [P, k, T] 1.0 on real tokens, 0.0 on padding. rewards: [P, k].
        beta: > 0. estimator: one of :data:`ESTIMATORS`. level: one of :data:`LEVELS`.
        baseline: "rloo" or "none". old_tok: [P, k, T] log pi_old ("k3_corrected"; default on-policy).

    Returns:
        Scalar loss (float32 for half-precision input).
    """
    beta = checks.beta(beta)
    checks.choice("estimator", estimator, ESTIMATORS)
    checks.choice("level", level, LEVELS)
    checks.choice("baseline", baseline, klpg.BASELINES)
    old_tok = logp_tok.detach() if old_tok is None else old_tok
    tensors = dict(logp_tok=logp_tok, ref_tok=ref_tok, mask=mask, old_tok=old_tok)
    for name, t in tensors.items():  # P >= 1 prompts, T >= 1 tokens: a mean over no sample is NaN
        checks.nonempty(name, checks.tensor(name, t, dims=3, floating=True))
    checks.tensor("rewards", rewards, dims=2, floating=True)
    checks.same_device(**tensors, rewards=rewards)
    checks.same_shape(**tensors)
    if tuple(rewards.shape) != tuple(logp_tok.shape[:2]) or logp_tok.shape[1] < (2 if baseline == "rloo" else 1):
        raise ValueError(f"rewards must have shape [P, k] = {tuple(logp_tok.shape[:2])} (k >= 2 for RLOO), "
                         f"got {tuple(rewards.shape)}")
    for name, t in (*tensors.items(), ("rewards", rewards)):
        checks.finite(name, t)
    if bool(((mask != 0) & (mask != 1)).any()) or not bool(mask.any()):
        raise ValueError("mask must hold only 0.0 (padding) and 1.0 (real tokens), and at least one real token")
    half = map(klpg._safe, (logp_tok, old_tok, ref_tok, mask, rewards))  # half precision in float32 (6e4 overflows it)
    loss = _surrogate(*half, beta, estimator, level, baseline).mean()
    return checks.fits("the loss", loss, "rescale the rewards or beta, or pass float64 tensors")


class SequenceWorld(NamedTuple):
    """Every sequence of ``length`` tokens over ``vocab`` symbols, with pi_ref and a terminal reward."""

    logp_ref: Tensor  # [n_prefixes, V] log pi_ref(y | h); prefixes by length, then in base-V order
    reward: Tensor  # [V^T] r(y), sequences in base-V order (y_1 the most significant digit)
    vocab: int  # V >= 2
    length: int  # T >= 1


def sequence_world(vocab: int = 2, length: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64,
                   device: str | torch.device = "cpu") -> SequenceWorld:
    """A random world: pi_ref(.|h) = softmax(N(0, 1) logits) per prefix, r(y) ~ U(0, 1) i.i.d. (<= MAX_SEQUENCES)."""
    V, T = _size("", vocab, length)
    g = torch.Generator().manual_seed(checks.integer("seed", seed, low=0))
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = checks.device("device", device)
    logp_ref = torch.log_softmax(torch.randn((V**T - 1) // (V - 1), V, generator=g, dtype=dtype), -1)  # [n_prefixes, V]
    return SequenceWorld(logp_ref.to(device), torch.rand(V**T, generator=g, dtype=dtype).to(device), V, T)


def _size(prefix: str, vocab, length) -> tuple[int, int]:
    V, T = checks.integer(f"{prefix}vocab", vocab, low=2), checks.integer(f"{prefix}length", length, low=1)
    if T > 64 or V**T > MAX_SEQUENCES:  # (T first: V**T of a huge T would take forever to compute)
        raise ValueError(f"{prefix}vocab**length = {V}**{T} is more than MAX_SEQUENCES = {MAX_SEQUENCES} sequences")
    return V, T


def _check_world(world: SequenceWorld) -> None:
    if not isinstance(world, SequenceWorld):
        raise TypeError(f"world must be a SequenceWorld, got {type(world).__name__}")
    V, T = _size("world.", world.vocab, world.length)
    checks.tensor("world.logp_ref", world.logp_ref, dims=2, floating=True)
    checks.tensor("world.reward", world.reward, dims=1, floating=True)
    checks.same_device(**{"world.logp_ref": world.logp_ref, "world.reward": world.reward})
    if tuple(world.logp_ref.shape) != ((V**T - 1) // (V - 1), V) or world.reward.shape[0] != V**T:
        raise ValueError(f"world.logp_ref must be [{(V**T - 1) // (V - 1)}, {V}] and world.reward [{V**T}] for "
                         f"V={V}, T={T}, got {tuple(world.logp_ref.shape)} and {tuple(world.reward.shape)}")
    checks.finite("world.logp_ref", world.logp_ref)
    checks.finite("world.reward", world.reward)


def _paths(world: SequenceWorld) -> tuple[Tensor, Tensor]:
    """(rows, tokens) [V^T, T]: the prefix row and the token of every position of every sequence."""
    V, T = world.vocab, world.length
    s = torch.arange(V**T, device=world.reward.device).unsqueeze(1)  # [S, 1]
    tau = torch.arange(T, device=s.device)  # [T]
    offset = (V**tau - 1) // (V - 1)  # first row of the prefixes of length tau
    return offset + s // V ** (T - tau), (s // V ** (T - 1 - tau)) % V


def _token_logp(world: SequenceWorld, logits: Tensor) -> Tensor:  # token_logp without checks
    return torch.log_softmax(logits, -1)[_paths(world)]  # [rows, tokens]


def _check_logits(world: SequenceWorld, logits: Tensor, allow_neg_inf: bool = False) -> None:
    checks.tensor("logits", logits, floating=True)
    checks.same_device(logits=logits, world=world.logp_ref)
    checks.same_shape(logits=logits, **{"world.logp_ref": world.logp_ref})
    checks.finite("logits", logits, allow_neg_inf=allow_neg_inf)
    if allow_neg_inf and bool(torch.isneginf(logits).all(-1).any()):
        raise ValueError("logits has a row that is -inf everywhere: it puts no mass anywhere")


def token_logp(world: SequenceWorld, logits: Tensor) -> Tensor:
    """[V^T, T] log pi(y_tau | y_<tau) of every sequence, pi = softmax(logits [n_prefixes, V]) per prefix (-inf: 0)."""
    _check_world(world)
    _check_logits(world, logits, allow_neg_inf=True)
    return _token_logp(world, logits)


def fixed_point(world: SequenceWorld, beta: float, kind: str = "optimum") -> Tensor:
    r"""log pi(y | h) [n_prefixes, V] by backward induction over the prefixes, longest first.

    * "optimum": pi*(y|h) ∝ pi_ref(y|h)·exp(V(hy)/beta), V(h) = beta·log sum_y pi_ref(y|h) e^{V(hy)/beta},
      V(y) = r(y) on complete sequences: the sequence-level pi* ∝ pi_ref·e^{r/beta};
    * "reverse": pi(y|h) ∝ pi_ref(y|h)·exp(Q(hy)/beta), Q(h) = sum_y pi(y|h) Q(hy): where the
      per-token reverse KL as a loss stops (eq. tok-rev; k2, k3_corrected);
    * "forward": pi(.|h) = :func:`refimpl.klpg.forward_kl_optimum` of pi_ref(.|h) and Q(h.) (k3, low_var_kl).
    """
    _check_world(world)
    beta = checks.beta(beta)
    checks.choice("kind", kind, ("optimum", "reverse", "forward"))
    V, T = world.vocab, world.length
    out = torch.empty_like(world.logp_ref)
    value = world.reward  # [V^(t+1)] the value of every prefix one token longer than the current level
    for t in reversed(range(T)):
        rows = slice((V**t - 1) // (V - 1), (V ** (t + 1) - 1) // (V - 1))
        ref, child = world.logp_ref[rows], value.reshape(V**t, V)  # [V^t, V] each
        logp = klpg.forward_kl_optimum(ref, child, beta) if kind == "forward" else kl.optimal_policy(ref, child, beta)
        value = beta * kl.log_partition(ref, child, beta) if kind == "optimum" else (logp.exp() * child).sum(-1)
        out[rows] = logp
    return checks.fits("fixed_point", out, "beta is too small for the dtype: raise beta or pass float64 tensors")


def _expected_gradient(world: SequenceWorld, logits: Tensor, beta: float, estimator: str, level: str) -> Tensor:
    with torch.enable_grad():
        theta = logits.detach().clone().requires_grad_(True)
        lt = _token_logp(world, theta).unsqueeze(0)  # [1, S, T]: every sequence, as if sampled
        ref = _token_logp(world, world.logp_ref).unsqueeze(0)
        per = _surrogate(lt, lt.detach(), ref, torch.ones_like(lt), world.reward.unsqueeze(0), beta, estimator,
                         level, "none")  # [1, S]
        (grad,) = torch.autograd.grad((lt.detach().sum(-1).exp() * per).sum(), theta)
    return grad


def expected_gradient(world: SequenceWorld, logits: Tensor, beta: float, estimator: str,
                      level: str = "token") -> Tensor:
    """E_{y~pi}[∇_logits loss(y)] exactly (on-policy; a baseline does not change it), [n_prefixes, V].

    The per-sample loss is :func:`penalized_pg_loss`'s, weighted by pi(y) held constant and summed
    over the V^T sequences; the closed forms are listed in the module docstring.
    """
    _check_world(world)
    beta = checks.beta(beta)
    checks.choice("estimator", estimator, ESTIMATORS)
    checks.choice("level", level, LEVELS)
    _check_logits(world, logits)
    return checks.fits("the expected gradient", _expected_gradient(world, logits, beta, estimator, level), "pass float64 tensors")


class Ascent(NamedTuple):
    """Exact expected-gradient steps from pi_ref: the final logits and the sequence law along the way."""

    logits: Tensor  # [n_prefixes, V] after the last step
    history: Tensor  # [steps + 1, V^T] log pi(y) before the first step and after each
    grad_norm: float  # max abs of the (preconditioned) expected gradient at the end: ~0 at a fixed point


def ascent(world: SequenceWorld, beta: float, estimator: str, level: str = "token", lr: float = 1.0,
           steps: int = 2000, per_prefix: bool = True) -> Ascent:
    r"""theta <- theta - lr·D·E[∇loss] from theta = log pi_ref, D = diag(1/pi(h)) if ``per_prefix``.

    The expected gradient of row h carries the factor pi(h) (the law of the prefix); dividing it out
    (``per_prefix``, a positive diagonal preconditioner) keeps every fixed point and reaches it in a
    number of steps that does not depend on how rare the prefix is. ``lr`` of order beta.
    """
    _check_world(world)
    beta = checks.beta(beta)
    checks.choice("estimator", estimator, ESTIMATORS)
    checks.choice("level", level, LEVELS)
    lr = checks.real("lr", lr, low=0.0, low_open=True)
    steps = checks.integer("steps", steps, low=1)
    per_prefix = checks.boolean("per_prefix", per_prefix)
    rows, _ = _paths(world)
    theta = world.logp_ref.detach().clone()
    history = [_token_logp(world, theta).sum(-1)]
    for _ in range(steps):
        grad = _expected_gradient(world, theta, beta, estimator, level)
        if per_prefix:
            reach = torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)  # pi(h) per prefix row
            lt = _token_logp(world, theta)  # [S, T]
            prefix = torch.cat([torch.zeros_like(lt[:, :1]), lt.cumsum(-1)[:, :-1]], -1).exp()  # [S, T] pi(y_<tau)
            reach.scatter_reduce_(0, rows.reshape(-1), prefix.reshape(-1), "amax")
            grad = grad / reach.clamp_min(torch.finfo(theta.dtype).tiny).unsqueeze(1)
        theta = theta - lr * grad
        history.append(_token_logp(world, theta).sum(-1))
    if not bool(torch.isfinite(theta).all() & torch.isfinite(grad).all()):
        raise ValueError(f"ascent diverged (the logits are no longer finite after {steps} steps): lower lr")
    return Ascent(theta, torch.stack(history), grad.abs().max().item())
