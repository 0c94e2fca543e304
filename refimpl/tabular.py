r"""Tabular policies over a finite support: the exact world's trainer for GVPO, GRPO and Dr. GRPO.

A tabular policy is a table of logits theta [P, N] (P prompts, N completions), pi_theta =
softmax(theta). Training it with the losses of :data:`refimpl.rl.LOSSES` on sampled groups shows
where each method's fixed point lies, exactly: every distribution can be compared with the
closed-form optimum of :mod:`refimpl.kl`. Each completion counts as one "token".
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from .rl import LOSSES, GroupBatch, RLConfig

__all__ = ["TabularRun", "train_tabular"]


class TabularRun(NamedTuple):
    """The final log pi_theta [P, N] and log pi_theta after every step."""

    logp: Tensor
    history: list[Tensor]


def train_tabular(logp_ref: Tensor, reward: Tensor, config: RLConfig, sampling: str = "policy",
                  anchor_every: int = 1, lengths: Tensor | None = None) -> TabularRun:
    r"""Train logits theta [P, N] (initialised at log pi_ref) on k sampled completions per prompt.

    1. sample k indices per prompt from ``sampling``: "policy" (on-policy pi_theta), "uniform",
       or "reference" (a stale snapshot: pi_ref, never refreshed);
       ("uniform" over the support of pi_ref: a completion with pi_ref = 0 has pi_theta = 0 too);
    2. gather log pi_theta, the sampling distribution's log-probs (GRPO's ratio denominator),
       the anchor "old" (the policy as it was ``anchor_every`` steps ago at most: refreshed every
       ``anchor_every`` steps) and log pi_ref, and R at them: [P, k];
    3. one SGD step (``config.lr``) on P times the configured loss (prompts have separate logits,
       so each prompt gets the step size of a lone group).

    With ``lengths`` (completion y has L(y) "tokens"), each log-prob is spread evenly over its L(y)
    tokens: sums over tokens are the completion's log-prob, token means are it divided by L(y)
    (``gvpo_rho="token_mean"``), and a per-token ratio is the completion's ratio to the power 1/L(y).

    With ``anchor="old"`` and a large ``anchor_every``, each period solves GVPO's problem around
    the policy at its start: a mirror-descent (trust-region) step pi_next ∝ pi_start·exp(R/beta).

    Args:
        logp_ref: [P, N] log pi_ref; reward: [P, N] R(x, y).
        config: :class:`refimpl.rl.RLConfig` (its LM-only fields must stay at their defaults).
        sampling: where the k completions come from.
        anchor_every: steps between refreshes of the "old" anchor, >= 1.
        lengths: [P, N] integer lengths L(y) >= 1 (default: every completion one token).

    Returns:
        :class:`TabularRun`.
    """
    checks.tensor("logp_ref", logp_ref, dims=2, floating=True)
    checks.tensor("reward", reward, dims=2, floating=True)
    checks.same_device(logp_ref=logp_ref, reward=reward)
    checks.same_shape(logp_ref=logp_ref, reward=reward)
    checks.nonempty("logp_ref", logp_ref)
    checks.finite("logp_ref", logp_ref, allow_neg_inf=True)
    checks.finite("reward", reward)
    support = ~torch.isneginf(logp_ref)  # [P, N]: where pi_ref (and so every pi_theta) is positive
    if not bool(support.any(-1).all()):
        raise ValueError("logp_ref has a row that is -inf everywhere: pi_ref puts no mass anywhere")
    checks.choice("sampling", sampling, ("policy", "uniform", "reference"))
    anchor_every = checks.integer("anchor_every", anchor_every, low=1)
    if not isinstance(config, RLConfig):
        raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
    defaults = RLConfig()
    for name in ("prompts_per_step", "minibatches", "epochs", "staleness", "replay", "max_grad_norm",
                 "max_new_tokens", "temperature"):
        if getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"config.{name} does not apply to train_tabular (one SGD step per sampled batch)")
    if lengths is None:
        lengths = torch.ones_like(logp_ref, dtype=torch.long)
    checks.lengths("lengths", lengths, like=logp_ref)
    t_max = int(lengths.max())
    theta = torch.nn.Parameter(logp_ref.detach().clone())  # [P, N]
    opt = torch.optim.SGD([theta], lr=config.lr)
    g = torch.Generator(device=logp_ref.device).manual_seed(config.seed)
    rows = torch.arange(logp_ref.shape[0], device=logp_ref.device).unsqueeze(1)  # [P, 1]
    uniform = torch.full_like(logp_ref, 0.0).masked_fill(~support, float("-inf")).log_softmax(-1)  # on the support
    history, start_all = [], None
    for step in range(config.steps):
        logp_all = torch.log_softmax(theta, dim=-1)  # [P, N]
        if step % anchor_every == 0:
            start_all = logp_all.detach()
        sampler = {"policy": logp_all.detach(), "uniform": uniform, "reference": logp_ref}[sampling]
        try:
            idx = torch.multinomial(sampler.softmax(-1), config.k, replacement=True, generator=g)  # [P, k]
        except RuntimeError as e:  # the policy's probabilities are no longer finite
            raise ValueError(f"train_tabular diverged at step {step} (pi_theta is not finite): lower config.lr "
                             "or rescale reward") from e
        n_tok = lengths[rows, idx].unsqueeze(-1)  # [P, k, 1]
        pad = torch.arange(t_max, device=logp_ref.device) >= n_tok  # [P, k, T]: past the completion's end
        spread = lambda t: (t[rows, idx].unsqueeze(-1) / n_tok).masked_fill(pad, 0.0)  # noqa: E731  # [P, k, T]
        batch = GroupBatch(spread(logp_all), spread(sampler), spread(start_all), spread(logp_ref),
                           (~pad).to(logp_ref.dtype), reward[rows, idx], max_tokens=t_max)
        value = LOSSES[config.loss].fn(batch, config)
        opt.zero_grad(set_to_none=True)
        (value * logp_ref.shape[0]).backward()
        opt.step()
        history.append(torch.log_softmax(theta.detach(), dim=-1))
    if bool(torch.isnan(history[-1]).any() | torch.isposinf(history[-1]).any()):
        raise ValueError("train_tabular diverged (the final pi_theta is not finite): lower config.lr or rescale reward")
    return TabularRun(history[-1], history)
