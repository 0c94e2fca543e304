r"""DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", arXiv 2305.18290) on a finite support, where its optimum can be found exactly.

With h(y) = log pi_theta(y) - log pi_ref(y) (the implicit reward is beta·h), a preference pair
(y_c ≻ y_r) costs

    l(y_c, y_r) = -log sigma(beta·[h(y_c) - h(y_r)])                                 (DPO, eq. 7)

Pairs are drawn y_a, y_b ~ mu i.i.d. (mu = pi_ref unless said otherwise) and labelled by the
Bradley-Terry model on the reward at a label temperature T,

    P(y_a ≻ y_b) = sigma((r(y_a) - r(y_b)) / T)                                      (BT, eq. 1)

so the population loss is L(theta) = sum_{a,b} W_ab·l(a, b) with W_ab = 2·mu(a) mu(b) P(a ≻ b),
the law of (chosen, rejected) (the pair can be drawn in either order). L is convex in h and,
when W_ab > 0 for every pair (full coverage), its minimiser is unique: beta·h = r/T + const, i.e.

    pi_DPO = pi_ref·exp(r / (beta·T)) / Z,                                            (optimum)

the KL-constrained optimum pi* of coefficient beta·T (their eq. 4-5); T = 1 (labels that are
BT on r itself) gives pi* of coefficient beta. Two ways to miss it, both exact here: finitely
many sampled pairs (the optimum is the empirical BT fit, and an outcome that only ever wins
or loses is pushed to h = ±inf: no finite optimum, Azar et al. 2023, "A General Theoretical
Paradigm to Understand Learning from Human Preferences"), and limited coverage (mu off part of
the support: the loss does not see those outcomes, so their logits stay where they started
and the split of mass between covered and uncovered outcomes is not pi*'s). DPO on a language
model's sampled pairs: :func:`refimpl.rft.finetune_dpo`. The pairs and their labels
(Bradley-Terry, or hard labels with ties dropped) come from :mod:`refimpl.preferences`; their
names are re-exported here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .preferences import (LABELS, LabelNoise, Pairs, label_noise, pair_table,  # noqa: F401 (re-exported)
                          preference_pairs, preference_table)

__all__ = ["dpo_loss", "dpo_population_loss", "DPORun", "train_dpo_tabular"]


def dpo_loss(logp_chosen: Tensor, logp_rejected: Tensor, logp_ref_chosen: Tensor, logp_ref_rejected: Tensor,
             beta: float) -> Tensor:
    r"""mean over pairs of -log sigma(beta·[(logp_c - logp_ref_c) - (logp_r - logp_ref_r)])   (eq. DPO).

    Args:
        logp_chosen, logp_rejected: [B] (any shape, the same for all four) sequence log pi_theta
            of the chosen and rejected completions, carrying the graph.
        logp_ref_chosen, logp_ref_rejected: the same under pi_ref (treated as constants).
        beta: KL coefficient, > 0.

    Returns:
        Scalar loss >= 0 (log 2 at pi_theta = pi_ref).
    """
    beta = checks.beta(beta)
    args = dict(logp_chosen=logp_chosen, logp_rejected=logp_rejected, logp_ref_chosen=logp_ref_chosen,
                logp_ref_rejected=logp_ref_rejected)
    for name, t in args.items():
        checks.tensor(name, t, floating=True)
    checks.same_device(**args)
    checks.same_shape(**args)
    if logp_chosen.numel() == 0:
        raise ValueError(f"logp_chosen must hold at least one pair, got shape {tuple(logp_chosen.shape)}")
    for name, t in args.items():
        checks.finite(name, t)
    if logp_chosen.dtype in (torch.float16, torch.bfloat16):  # the margin overflows half precision from 6e4
        logp_chosen, logp_rejected, logp_ref_chosen, logp_ref_rejected = (
            t.float() for t in (logp_chosen, logp_rejected, logp_ref_chosen, logp_ref_rejected))
    margin = (logp_chosen - logp_ref_chosen.detach()) - (logp_rejected - logp_ref_rejected.detach())  # [B]
    return -F.logsigmoid(beta * margin).mean()


def _table_loss(logp: Tensor, logp_ref: Tensor, W: Tensor, beta: float) -> Tensor:
    """sum_{a,b} W_ab·(-log sigma(beta·(h_a - h_b))), h = logp - logp_ref; [..., N], [..., N, N] -> [...]."""
    h = logp - logp_ref  # [..., N]
    margin = h.unsqueeze(-1) - h.unsqueeze(-2)  # [..., N, N]: h_a - h_b
    return -(W * F.logsigmoid(beta * margin)).sum((-2, -1))


def dpo_population_loss(logp: Tensor, logp_ref: Tensor, reward: Tensor, beta: float, label_temperature: float = 1.0,
                        logp_data: Tensor | None = None, labels: str = "bradley_terry") -> Tensor:
    r"""L = sum_{a,b} 2 mu(a) mu(b) P(a ≻ b)·(-log sigma(beta·[h_a - h_b])): the expected DPO loss, exactly.

    The expectation of :func:`dpo_loss` over pairs from :func:`refimpl.preferences.preference_pairs`
    (no sampling). With full coverage its minimiser is pi_ref·exp(r/(beta·T))/Z (eq. optimum).

    Args:
        logp: [..., N] log pi_theta (finite), carrying the graph.
        logp_ref, reward, label_temperature, logp_data, labels: as in
            :func:`refimpl.preferences.preference_table`.
        beta: KL coefficient, > 0.

    Returns:
        [...] the population loss per prompt.
    """
    beta = checks.beta(beta)
    checks.same_device(logp=logp, logp_ref=logp_ref, reward=reward, logp_data=logp_data)
    W = preference_table(logp_ref, reward, label_temperature, logp_data, labels)  # checks logp_ref and reward
    checks.tensor("logp", logp, floating=True)
    checks.same_shape(logp=logp, logp_ref=logp_ref)
    checks.finite("logp", logp)
    if logp.dtype in (torch.float16, torch.bfloat16) or logp_ref.dtype in (torch.float16, torch.bfloat16):
        logp, logp_ref, W = logp.float(), logp_ref.float(), W.float()  # margins overflow half precision
    return _table_loss(logp, logp_ref, W, beta)


class DPORun(NamedTuple):
    """The final log pi_theta [P, N] and the loss (summed over prompts) before every step."""

    logp: Tensor
    loss: list[float]


def _curvature(h: Tensor, W: Tensor, beta: float) -> Tensor:
    """The diagonal of the loss's Hessian in h [P, N]:
    sum_{b != a} (W_ab + W_ba)·beta²·sigma(m_ab)·sigma(-m_ab), m_ab = beta(h_a - h_b)."""
    m = beta * (h.unsqueeze(-1) - h.unsqueeze(-2))  # [P, N, N]
    c = beta**2 * W * torch.sigmoid(m) * torch.sigmoid(-m)  # [P, N, N]
    return (c + c.transpose(-1, -2)).sum(-1) - 2 * c.diagonal(dim1=-2, dim2=-1)  # [P, N]


def train_dpo_tabular(logp_ref: Tensor, pairs: Pairs | Tensor, beta: float, steps: int, lr: float,
                      precondition: bool = False) -> DPORun:
    r"""Full-batch gradient descent on DPO for logits theta [P, N], initialised at log pi_ref.

    Each step is one gradient step on sum_prompts sum_{a,b} W_ab·l(a, b) (every prompt has its own
    logits, so each gets the step of a lone problem): with W = :func:`~refimpl.preferences.pair_table`
    of sampled pairs this is the mean :func:`dpo_loss` over them; with W =
    :func:`~refimpl.preferences.preference_table` it is :func:`dpo_population_loss`. Outcomes that
    appear in no pair get no gradient: their logits stay at log pi_ref. The curvature of L in h_a
    scales as beta²·mu(a), so plain steps crawl on rare outcomes; ``precondition=True`` divides
    each logit's step by that curvature (a Jacobi step: the Hessian is a weighted graph Laplacian,
    so D^-1·H has eigenvalues in [0, 2] and lr must not exceed 1, else a mode grows (raises); at lr = 1 it can flip
    sign forever), which at lr = 0.5 reaches the exact optimum of the exact world in tens of steps.

    Args:
        logp_ref: [P, N] log pi_ref (finite).
        pairs: :class:`Pairs` of sampled pairs ([P, M] indices, moved to logp_ref's device), or a
            [P, N, N] table W of pair weights (non-negative, each prompt's summing to 1) on
            logp_ref's device.
        beta: KL coefficient, > 0.
        steps: >= 1. lr: step size, > 0 (plain steps: of order 1/beta²; preconditioned: in (0, 1]).
        precondition: divide each logit's step by the diagonal of the Hessian.

    Returns:
        :class:`DPORun`.
    """
    precondition = checks.boolean("precondition", precondition)
    checks.same_device(logp_ref=logp_ref, pairs=pairs if isinstance(pairs, Tensor) else None)
    checks.nonempty("logp_ref", checks.tensor("logp_ref", logp_ref, dims=2, floating=True))
    checks.finite("logp_ref", logp_ref)
    beta = checks.beta(beta)
    steps = checks.integer("steps", steps, low=1)
    lr = checks.real("lr", lr, low=0.0, low_open=True, high=1.0 if precondition else None)
    P, N = logp_ref.shape
    if isinstance(pairs, Pairs):
        if pairs.chosen.dim() != 2 or pairs.chosen.shape[0] != P:
            raise ValueError(f"pairs.chosen must have shape [{P}, M] (one row per prompt of logp_ref), "
                             f"got {tuple(pairs.chosen.shape)}")
        W = pair_table(pairs, N, logp_ref.dtype).to(logp_ref.device)
    elif isinstance(pairs, Tensor):
        checks.tensor("pairs", pairs, dims=3, floating=True)
        if pairs.shape != (P, N, N):
            raise ValueError(f"pairs must be a [P, N, N] = [{P}, {N}, {N}] table, got shape {tuple(pairs.shape)}")
        checks.finite("pairs", pairs)
        total = pairs.sum((-2, -1)).double()  # [P]
        if bool((pairs < 0).any()) or not torch.allclose(total, torch.ones_like(total)):
            raise ValueError("pairs must be non-negative and sum to 1 for each prompt (a law of (chosen, rejected))")
        W = pairs.to(logp_ref.dtype)
    else:
        raise TypeError(f"pairs must be a Pairs or a [P, N, N] tensor, got {type(pairs).__name__}")
    theta = logp_ref.detach().clone().requires_grad_(True)  # [P, N]
    losses = []
    for _ in range(steps):
        loss = _table_loss(theta, logp_ref, W, beta).sum()  # only differences of h count: no softmax needed
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            if precondition:
                diag = _curvature(theta - logp_ref, W, beta)  # [P, N]; 0 for outcomes in no pair
                safe = diag.clamp_min(torch.finfo(diag.dtype).tiny)
                grad = torch.where(diag > 0, grad / safe, torch.zeros_like(grad))
            theta -= lr * grad
        losses.append(loss.detach())
    return DPORun(torch.log_softmax(theta.detach(), -1), torch.stack(losses).tolist())
