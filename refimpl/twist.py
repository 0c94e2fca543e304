r"""Twisted SMC for a banned set: the optimal twist ψ_t = P(allowed | x, y_≤t), and an estimate of it.

Target: completions of a fixed length L (the *horizon*) with no banned token,
π(y | x) = P(y | x) 1[y allowed] / P(allowed | x). Given a twist ψ_t(x, y_≤t) ≥ 0 with ψ_L = 1,
the SMC step (:class:`TwistedBanStep`, for :func:`refimpl.smc.smc`)

.. math::  q_t(v) \propto P(v \mid x, y_{<t})\,\mathbb 1[v \notin B(y_{<t})]\,\psi_t(y_{<t} v),\qquad
           \gamma_t(v) = P(v \mid x, y_{<t})\,\mathbb 1[v \notin B(y_{<t})]\,
           \frac{\psi_t(y_{<t} v)}{\psi_{t-1}(y_{<t})}

telescopes to Π_t γ_t = P(y) 1[y allowed] / ψ_0: the target is π whatever ψ is, and ψ only moves
the weights. Each step's weight Σ_v γ_t(v) is known before the draw (``smc(..., adapted=True)``
resamples on it). The optimal twist ψ*_t = P(allowed | x, y_≤t) makes every weight 1, so every
particle is an exact draw from π (Zhao et al. 2024, arXiv 2404.17546, twisted SMC); it is the
expected future grammaticality of grammar-aligned decoding (Park et al. 2024, arXiv 2405.21047),
and ψ ≡ 1 is (G)I-DLE's token-level renormalization. :func:`exact_twist` computes ψ* from the
enumerated allowed completions; :func:`asap_twist` estimates it from samples as ASAp does: on
the prefixes the samples visited, ψ̂(u) = Σ_v P(v | u) 1[v ∉ B(u)] ψ̂(u v), with ψ̂ = 1 on prefixes
never visited, an upper bound of ψ* that tightens as samples accumulate.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import checks, constraints, lm
from .sampling import Samples
from .smc import StepLogits

__all__ = ["PrefixTwist", "TwistedBanStep", "exact_twist", "asap_twist"]


class PrefixTwist:
    """log ψ over (prompt, completion prefix): ``values[key(prompt, prefix)]``; a prefix not in
    ``values`` takes ``default`` (0: ψ = 1; -inf: ψ = 0), and ψ = 1 at depth ``horizon``. Prompts are
    token ids with their leading ``pad_token_id`` removed, so any left padding gives the same key."""

    def __init__(self, values: dict, horizon: int, default: float = 0.0, pad_token_id: int | None = None):
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict of prefix keys to log psi, got {type(values).__name__}")
        self.values, self.horizon = values, checks.integer("horizon", horizon, low=1)
        self.default = float("-inf") if default == float("-inf") else checks.real("default", default, high=0.0)
        self.pad_token_id = None if pad_token_id is None else checks.integer("pad_token_id", pad_token_id, low=0)

    def key(self, prompt: Sequence[int], prefix: Sequence[int]) -> tuple:
        """The dictionary key of a prompt's token ids and a completion prefix."""
        prompt = list(prompt)
        while prompt and self.pad_token_id is not None and prompt[0] == self.pad_token_id:
            prompt = prompt[1:]
        return (*prompt, -1, *prefix)

    def log_psi(self, keys: Sequence[tuple], depth: int) -> Tensor:
        """[len(keys)] float64 log ψ of prefixes of length ``depth`` (0 at the horizon)."""
        if depth >= self.horizon:
            return torch.zeros(len(keys), dtype=torch.float64)
        return torch.tensor([self.values.get(k, self.default) for k in keys], dtype=torch.float64)


class TwistedBanStep:
    r"""SMC step log q_t ∝ log P_T + log 1[v ∉ B] + log ψ_t(y_<t v), log γ_t = that numerator
    - log ψ_{t-1}(y_<t) (module docstring). State: (constraint state, token ids so far [N, W + t])."""

    def __init__(self, banned_ids, twist: PrefixTwist, temperature: float = 1.0):
        if not isinstance(twist, PrefixTwist):
            raise TypeError(f"twist must be a PrefixTwist, got {type(twist).__name__}")
        self.constraint, self.twist = constraints.as_constraint(banned_ids), twist
        self.temperature = checks.real("temperature", temperature, low=0.0, low_open=True)
        self._width = None

    def start(self, prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
        self._width = prompt_ids.shape[1]
        return self.constraint.start(prompt_ids), prompt_ids

    def advance(self, state, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.constraint.advance(state[0], tokens), torch.cat([state[1], tokens[:, None].to(state[1])], 1)

    def __call__(self, state, logits: Tensor) -> StepLogits:
        rows, V, W = state[1].tolist(), logits.shape[-1], self._width
        t = len(rows[0]) - W
        now = self.twist.log_psi([self.twist.key(r[:W], r[W:]) for r in rows], t)  # [N]
        nxt = self.twist.log_psi([self.twist.key(r[:W], r[W:] + [v]) for r in rows for v in range(V)], t + 1)
        nxt, now = nxt.view(len(rows), V).to(logits.device), now.to(logits.device)
        log_p = torch.log_softmax(logits.double() / self.temperature, -1)
        num = (log_p + nxt).masked_fill(self.constraint.banned(state[0], V, logits.device), float("-inf"))
        return StepLogits(torch.log_softmax(num, -1).float(), (num - now[:, None]).float())


def exact_twist(token_logp: Tensor, prompt_ids: Tensor, completion_ids: Tensor,
                pad_token_id: int | None = None) -> PrefixTwist:
    r"""ψ*_t(x, y_≤t) = Σ_{y' allowed, y'_≤t = y_≤t} P(y'_{>t} | x, y_≤t) = P(allowed | x, y_≤t), from
    the enumeration of every allowed completion.

    Args:
        token_logp: [P, N, L] log P(y_t | x_p, y_<t) of each allowed completion under each prompt.
        prompt_ids: [P, W] the prompts' token ids.
        completion_ids: [N, L] every allowed completion of length L (the horizon), once each.

    Returns:
        :class:`PrefixTwist` with ψ = 0 (``default=-inf``) on every prefix not listed (disallowed).
    """
    checks.same_device(token_logp=token_logp, prompt_ids=prompt_ids, completion_ids=completion_ids)
    checks.nonempty("token_logp", checks.tensor("token_logp", token_logp, dims=3, floating=True))
    checks.tensor("completion_ids", completion_ids, dims=2, integral=True)
    checks.tensor("prompt_ids", prompt_ids, dims=2, integral=True)
    P, N, L = token_logp.shape
    if completion_ids.shape != (N, L) or prompt_ids.shape[0] != P:
        raise ValueError(f"token_logp [P, N, L] = {tuple(token_logp.shape)} needs completion_ids [N, L] and "
                         f"prompt_ids [P, W], got {tuple(completion_ids.shape)} and {tuple(prompt_ids.shape)}")
    checks.finite("token_logp", token_logp, allow_neg_inf=True)
    suffix = token_logp.double().flip(-1).cumsum(-1).flip(-1)  # [P, N, L]: Σ_{s ≥ t} log P(y_s | ...)
    suffix = torch.cat([suffix, torch.zeros(P, N, 1, dtype=suffix.dtype, device=suffix.device)], -1)
    twist, values = PrefixTwist({}, L, float("-inf"), pad_token_id), {}
    prompts, comp = prompt_ids.tolist(), completion_ids.cpu()
    for t in range(L + 1):
        uniq, inv = torch.unique(torch.nn.functional.pad(comp[:, :t], (1, 0)), dim=0, return_inverse=True)
        uniq = uniq[:, 1:]  # the G distinct prefixes of length t (the padded column makes t = 0 work)
        inv, x = inv.to(suffix.device).expand(P, N), suffix[:, :, t]  # [P, N] each
        top = torch.full((P, len(uniq)), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(1, inv, x, "amax")
        total = torch.zeros_like(top).scatter_add_(1, inv, (x - top.gather(1, inv)).exp())  # [P, G]
        log_psi = (total.log() + top).tolist()  # logsumexp over the completions that share each prefix
        for p in range(P):
            values.update({twist.key(prompts[p], u): log_psi[p][g] for g, u in enumerate(uniq.tolist())})
    twist.values = values
    return twist


@torch.no_grad()
def asap_twist(model, samples: Samples, banned_ids, horizon: int, pad_token_id: int | None = None) -> PrefixTwist:
    r"""ASAp's estimate of ψ* from samples (any sampler): on every prefix u the samples visited,
    ψ̂(u) = Σ_v P(v | x, u) 1[v ∉ B(u)] ψ̂(u v), ψ̂ = 1 on prefixes never visited and at the horizon.
    Costs one forward pass over the samples (the next-token laws at the visited prefixes).

    Args:
        samples: completions of length ``horizon`` (their first ``horizon`` tokens are used).
        banned_ids: token ids or a :class:`refimpl.constraints.Constraint`.

    Returns:
        :class:`PrefixTwist` (``default=0``): ψ̂ ≥ ψ* everywhere, = ψ* where every allowed
        continuation was visited.
    """
    if not isinstance(samples, Samples):
        raise TypeError(f"samples must be a refimpl.sampling.Samples, got {type(samples).__name__}")
    horizon = checks.integer("horizon", horizon, low=1)
    c, comp = constraints.as_constraint(banned_ids), samples.completion_ids[:, :horizon]
    if comp.shape[1] < horizon or not bool(samples.completion_mask[:, :horizon].all()):
        raise ValueError(f"samples must have at least horizon={horizon} real completion tokens")
    ones = torch.ones_like(comp)
    logits = lm._forward(model, samples.prompt_ids, samples.prompt_mask, comp, ones).logits
    log_p = torch.log_softmax(lm.completion_logits(logits, samples.prompt_ids.shape[1]).double(), -1)  # [M, L, V]
    V = log_p.shape[-1]
    masks = list(constraints.iter_banned(c, samples.prompt_ids, comp, V))  # L x [M, V]
    twist = PrefixTwist({}, horizon, 0.0, pad_token_id)
    prompts, rows, gamma = samples.prompt_ids.tolist(), comp.tolist(), {}  # node -> [V] log P 1[allowed]
    for t in range(horizon):
        lg = log_p[:, t].masked_fill(masks[t], float("-inf")).cpu()
        for i, r in enumerate(rows):
            gamma.setdefault((t, twist.key(prompts[i], r[:t])), lg[i])
    for (t, key) in sorted(gamma, key=lambda n: -n[0]):  # deepest first: the children are done
        child = torch.tensor([twist.values.get((*key, v), 0.0) for v in range(V)], dtype=torch.float64)  # unseen: 1
        twist.values[key] = torch.logsumexp(gamma[t, key] + child, 0).item()
    return twist
