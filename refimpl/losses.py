r"""The loss table of :mod:`refimpl.rl`: what a loss sees (:class:`GroupBatch`) and every loss.

Every entry of :data:`LOSSES` takes a :class:`GroupBatch` (k completions for each of P prompts,
per token) and the run's :class:`refimpl.rl.RLConfig` and returns a scalar: GVPO
(:mod:`refimpl.gvpo`), GRPO and Dr. GRPO (:mod:`refimpl.grpo`), KL-regularised policy gradient
(:mod:`refimpl.klpg`, :mod:`refimpl.klest`). Each entry lists the config fields it reads; the
others must stay at their defaults. :mod:`refimpl.rl` re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from torch import Tensor

from . import checks, klest, klpg
from .gvpo import _centre, _gvpo_loss
from .grpo import _dr_grpo_loss, _grpo_loss

__all__ = ["GroupBatch", "Loss", "LOSSES"]


@dataclass(frozen=True)
class GroupBatch:
    """What a loss sees: k completions for each of P prompts, per token."""

    logp_tok: Tensor  # [P, k, T] log pi_theta per token, carrying the graph (0 on padding)
    behavior_tok: Tensor  # [P, k, T] log-probs of the policy that generated the samples (no graph)
    start_tok: Tensor  # [P, k, T] log-probs of the policy at the start of this step's updates (no graph)
    ref_tok: Tensor  # [P, k, T] log pi_ref per token (no graph)
    mask: Tensor  # [P, k, T] 1.0 on real completion tokens
    rewards: Tensor  # [P, k]
    max_tokens: int  # the generation budget T_max (Dr. GRPO's constant)

    def __post_init__(self):  # shapes and kinds only: no value is read (it is built at every update)
        for name in ("logp_tok", "behavior_tok", "start_tok", "ref_tok", "mask"):
            checks.tensor(name, getattr(self, name), dims=3, floating=True)
        checks.same_shape(logp_tok=self.logp_tok, behavior_tok=self.behavior_tok, start_tok=self.start_tok,
                          ref_tok=self.ref_tok, mask=self.mask)
        if checks.tensor("rewards", self.rewards, dims=2).shape != self.logp_tok.shape[:2]:
            raise ValueError(f"rewards must have shape [P, k] = {tuple(self.logp_tok.shape[:2])}, "
                             f"got {tuple(self.rewards.shape)}")
        checks.integer("max_tokens", self.max_tokens, low=1)


def _gvpo(b: GroupBatch, c: "RLConfig") -> Tensor:
    length = b.mask.sum(-1).clamp(min=1) if c.gvpo_rho == "token_mean" else 1  # [P, k]: rho / L(y), or rho
    anchor = (b.ref_tok if c.anchor == "reference" else b.start_tok).sum(-1) / length  # [P, k]
    logp = b.logp_tok.sum(-1) / length
    if c.gvpo_terms == "both":
        loss = _gvpo_loss(logp, anchor, b.rewards, c.beta)
    else:  # the paper's ablations: one of the two terms of ½Var(R) - beta Cov(R, rho) + ½beta² Var(rho)
        k = logp.shape[1]
        rho = _centre(logp - anchor)
        term = (-c.beta * _centre(b.rewards) * rho if c.gvpo_terms == "covariance" else 0.5 * c.beta**2 * rho**2)
        loss = (term.sum(1) / (k - 1)).mean()
    return loss * b.rewards.shape[0] if c.gvpo_reduction == "sum" else loss


def _grpo(b: GroupBatch, c: "RLConfig") -> Tensor:
    return _grpo_loss(b.logp_tok, b.behavior_tok, b.mask, b.rewards, c.clip_eps, c.kl_coef, b.ref_tok)


def _dr_grpo(b: GroupBatch, c: "RLConfig") -> Tensor:
    return _dr_grpo_loss(b.logp_tok, b.behavior_tok, b.mask, b.rewards, c.clip_eps, b.max_tokens)


def _kl_pg(b: GroupBatch, c: "RLConfig") -> Tensor:
    if c.kl_level == "sequence" and c.kl_estimator in klpg.ESTIMATORS:
        return klpg._surrogate(b.logp_tok.sum(-1), b.ref_tok.sum(-1), b.rewards, c.beta, c.kl_estimator,
                               c.kl_baseline).mean()
    return klest._surrogate(b.logp_tok, b.behavior_tok, b.ref_tok, b.mask, b.rewards, c.beta, c.kl_estimator,
                            c.kl_level, c.kl_baseline).mean()


class Loss(NamedTuple):
    fn: Callable[[GroupBatch, "RLConfig"], Tensor]  # (batch, config) -> scalar loss
    options: tuple[str, ...]  # the loss-specific config fields it reads


LOSSES: dict[str, Loss] = {
    "gvpo": Loss(_gvpo, ("anchor", "beta", "gvpo_terms", "gvpo_reduction", "gvpo_rho")),
    "grpo": Loss(_grpo, ("clip_eps", "kl_coef")),
    "dr_grpo": Loss(_dr_grpo, ("clip_eps",)),
    "kl_pg": Loss(_kl_pg, ("beta", "kl_estimator", "kl_baseline", "kl_level")),
}
_LOSS_OPTIONS = tuple(dict.fromkeys(name for entry in LOSSES.values() for name in entry.options))  # each once
