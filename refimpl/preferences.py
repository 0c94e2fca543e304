r"""Preference pairs over a finite support, and how they are labelled.

Pairs are drawn y_a, y_b ~ mu i.i.d. (mu = pi_ref unless said otherwise) and labelled by the
Bradley-Terry model on the reward at a label temperature T (Rafailov et al. 2023, "Direct
Preference Optimization", arXiv 2305.18290, eq. 1):

    P(y_a ≻ y_b) = sigma((r(y_a) - r(y_b)) / T),                                     (BT)

so the law of (chosen, rejected) is W_ab = 2·mu(a) mu(b) P(a ≻ b) (the pair can be drawn in
either order). Hard labels with ties dropped instead keep only the pairs with r_a ≠ r_b and
choose the better one: W_ab = mu(a) mu(b)·1[r_a > r_b] / P(r_a ≠ r_b).                   (hard)

On 0/1 rewards with p = P_mu(r = 1), BT at T = 1 keeps the ties, P(r_a = r_b) = p² + (1-p)² >= ½
of the pairs, each labelled by a coin flip (sigma(0) = ½), and labels sigma(-1) = 27% of the
informative pairs the wrong way (:func:`label_noise`); hard labels have neither, and no finite
DPO optimum (every reward gap is pushed to h = ±inf). The DPO losses are in :mod:`refimpl.dpo`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from .klpg import _safe  # half precision in float32

__all__ = ["LABELS", "Pairs", "preference_pairs", "preference_table", "LabelNoise", "label_noise", "pair_table"]

LABELS = ("bradley_terry", "hard")  # how a pair is labelled: eq. (BT) at temperature T, or eq. (hard)


def _check_world(logp_ref: Tensor, reward: Tensor, label_temperature: float, labels: str = "bradley_terry",
                 **others) -> float:
    """logp_ref and reward [..., N] (finite), on the device of the ``others`` too (checked first)."""
    checks.tensor("logp_ref", logp_ref, min_dims=1, floating=True)
    checks.tensor("reward", reward, min_dims=1, floating=True)
    checks.same_device(logp_ref=logp_ref, reward=reward, **others)
    checks.same_shape(logp_ref=logp_ref, reward=reward)
    if logp_ref.shape[-1] < 1:
        raise ValueError(f"logp_ref must have a support of N >= 1 outcomes, got shape {tuple(logp_ref.shape)}")
    checks.finite("logp_ref", logp_ref)  # DPO divides by pi_ref: it must be positive everywhere
    checks.finite("reward", reward)
    T = checks.beta(label_temperature, "label_temperature", allow_zero=True)
    if checks.choice("labels", labels, LABELS) == "hard" and T != 1.0:
        raise ValueError(f"label_temperature={T} does not apply to labels='hard' (leave it at 1.0)")
    return T


def _bt(reward_a: Tensor, reward_b: Tensor, T: float) -> Tensor:
    """P(a ≻ b) = sigma((r_a - r_b)/T); at T = 0 the hard label 1[r_a > r_b], 1/2 on a tie."""
    if T == 0:
        return 0.5 * (torch.sign(reward_a - reward_b) + 1)
    gap = reward_a - reward_b
    if T < torch.finfo(gap.dtype).tiny:  # T rounds to 0 (or a subnormal) in this dtype: 0/T would be NaN
        return torch.sigmoid(gap.double() / T).to(gap.dtype)
    return torch.sigmoid(gap / T)


class _PairFields(NamedTuple):
    chosen: Tensor  # [P, M] long: the preferred completion of each pair
    rejected: Tensor  # [P, M] long: the other one


class Pairs(_PairFields):
    """Labelled preference pairs: indices into the support, per prompt (``chosen``, ``rejected``: [P, M]
    integer tensors; their shapes, devices and values are checked where they are used)."""

    __slots__ = ()

    def __new__(cls, chosen: Tensor, rejected: Tensor):
        for name, t in (("chosen", chosen), ("rejected", rejected)):
            checks.tensor(name, t, integral=True)
        return super().__new__(cls, chosen, rejected)


def preference_pairs(logp_ref: Tensor, reward: Tensor, n_pairs: int, label_temperature: float = 1.0,
                     generator: torch.Generator | None = None, labels: str = "bradley_terry") -> Pairs:
    r"""M pairs per prompt: y_a, y_b ~ pi_ref i.i.d., y_a chosen with probability sigma((r_a - r_b)/T)   (eq. BT).

    With ``labels="hard"``: (y_a, y_b) ~ pi_ref⊗pi_ref conditioned on r_a ≠ r_b (ties dropped, as
    many pairs kept as asked) and the better one chosen; ``label_temperature`` must stay at 1.0.
    A prompt whose outcomes all share one reward has no such pair: it gets null pairs (y, y),
    y ~ pi_ref, whose DPO loss is the constant log 2 (no gradient).

    Args:
        logp_ref: [P, N] log pi_ref (finite). reward: [P, N] r(x, y).
        n_pairs: M >= 1 pairs per prompt (a Bradley-Terry pair may repeat an outcome: y_a = y_b).
        label_temperature: T >= 0 (0: the better completion always wins, ties by a coin flip).
        generator: for reproducible draws (on the tensors' device).
        labels: one of :data:`LABELS`.

    Returns:
        :class:`Pairs` of [P, M] indices.
    """
    T = _check_world(logp_ref, reward, label_temperature, labels, generator=getattr(generator, "device", None))
    checks.tensor("logp_ref", logp_ref, dims=2)
    n_pairs = checks.integer("n_pairs", n_pairs, low=1)
    logp_ref, reward = _safe(logp_ref), _safe(reward)
    if labels == "hard":
        W = preference_table(logp_ref, reward, labels="hard")  # [P, N, N] law of (chosen, rejected)
        N = W.shape[-1]
        cell = torch.multinomial(W.flatten(1), n_pairs, replacement=True, generator=generator)  # [P, M]
        return Pairs(cell // N, cell % N)
    P, dev = logp_ref.shape[0], logp_ref.device
    ab = torch.multinomial(torch.softmax(logp_ref, -1), 2 * n_pairs, replacement=True, generator=generator)
    a, b = ab[:, :n_pairs], ab[:, n_pairs:]  # [P, M] each
    p_win = _bt(reward.gather(1, a), reward.gather(1, b), T)  # [P, M]
    a_wins = torch.rand(P, n_pairs, generator=generator, dtype=p_win.dtype, device=dev) < p_win
    return Pairs(torch.where(a_wins, a, b), torch.where(a_wins, b, a))


def preference_table(logp_ref: Tensor, reward: Tensor, label_temperature: float = 1.0,
                     logp_data: Tensor | None = None, labels: str = "bradley_terry") -> Tensor:
    r"""W_ab = 2·mu(a)·mu(b)·P(a ≻ b): the exact law of (chosen, rejected)   (eq. BT).

    The factor 2: a ≻ b arises from the draw (a, b) and from the draw (b, a). ``labels="hard"``:
    W_ab ∝ mu(a)·mu(b)·1[r_a > r_b] (ties dropped); W_aa = mu(a) where all tie (null pairs).

    Args:
        logp_ref: [..., N] log pi_ref (finite; only its shape is used when ``logp_data`` is given).
        reward: [..., N] r(y).
        label_temperature: T >= 0 (1.0 with hard labels).
        logp_data: [..., N] log mu, where the pairs' completions come from (default pi_ref);
            ``-inf`` marks outcomes that never appear in a pair (limited coverage).
        labels: one of :data:`LABELS`.

    Returns:
        [..., N, N] probabilities (chosen a on dim -2, rejected b on dim -1), summing to 1 (float32 for
        half-precision input).
    """
    T = _check_world(logp_ref, reward, label_temperature, labels, logp_data=logp_data)
    if logp_data is None:
        logp_data = logp_ref
    checks.tensor("logp_data", logp_data, floating=True)
    checks.same_shape(logp_ref=logp_ref, logp_data=logp_data)
    checks.finite("logp_data", logp_data, allow_neg_inf=True)
    if bool(torch.isneginf(logp_data).all(-1).any()):
        raise ValueError("logp_data has a row that is -inf everywhere: no pair can be drawn")
    reward = _safe(reward)
    mu = torch.softmax(_safe(logp_data), -1)  # [..., N]
    joint = mu.unsqueeze(-1) * mu.unsqueeze(-2)  # [..., N, N] the draw (a, b)
    if labels == "bradley_terry":
        return 2 * joint * _bt(reward.unsqueeze(-1), reward.unsqueeze(-2), T)
    W = joint * (reward.unsqueeze(-1) > reward.unsqueeze(-2))  # [..., N, N] half of the untied mass
    total = W.sum((-2, -1), keepdim=True)
    return torch.where(total > 0, W / total.clamp_min(torch.finfo(W.dtype).tiny), torch.diag_embed(mu))


class LabelNoise(NamedTuple):
    """How Bradley-Terry labels relate to the reward, per prompt, exactly."""

    tied: Tensor  # [...] P(r_a = r_b): pairs whose label is a coin flip
    flipped: Tensor  # [...] P(label disagrees with r | r_a ≠ r_b): informative pairs labelled the wrong way


def label_noise(logp_ref: Tensor, reward: Tensor, label_temperature: float = 1.0) -> LabelNoise:
    r"""tied = sum_{a,b} mu(a)mu(b)·1[r_a = r_b]; flipped = sum_{r_a > r_b} 2mu(a)mu(b)·P(b ≻ a) / (1 - tied).

    flipped is 0 for a prompt without informative pairs. On 0/1 rewards, p = P_mu(r = 1):
    tied = p² + (1-p)² >= ½ and flipped = sigma(-1/T).

    Args:
        logp_ref: [..., N] log pi_ref (the pairs' law mu). reward: [..., N]. label_temperature: T >= 0.

    Returns:
        :class:`LabelNoise` [...].
    """
    T = _check_world(logp_ref, reward, label_temperature)
    reward = _safe(reward)
    mu = torch.softmax(_safe(logp_ref), -1)
    joint = mu.unsqueeze(-1) * mu.unsqueeze(-2)  # [..., N, N]
    gap = reward.unsqueeze(-1) - reward.unsqueeze(-2)  # r_a - r_b
    tied = (joint * (gap == 0)).sum((-2, -1))
    wrong = (2 * joint * (gap > 0) * _bt(reward.unsqueeze(-2), reward.unsqueeze(-1), T)).sum((-2, -1))  # b ≻ a
    return LabelNoise(tied, torch.where(tied < 1, wrong / (1 - tied).clamp_min(torch.finfo(mu.dtype).tiny), 0 * wrong))


def pair_table(pairs: Pairs, n_outcomes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The empirical law of (chosen, rejected): W_ab = #{pairs (a ≻ b)} / M, [P, N, N].

    Training on it is full-batch training on :func:`refimpl.dpo.dpo_loss` over the pairs (the same loss).

    Args:
        pairs: :class:`Pairs` with [P, M] indices in 0..N-1.
        n_outcomes: N, the size of the support.
        dtype: of the table, a floating-point dtype (it holds probabilities).
    """
    if not isinstance(pairs, Pairs):
        raise TypeError(f"pairs must be a Pairs (from preference_pairs), got {type(pairs).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (the table holds probabilities), got {dtype!r}")
    N = checks.integer("n_outcomes", n_outcomes, low=1)
    checks.same_device(**{"pairs.chosen": pairs.chosen, "pairs.rejected": pairs.rejected})
    for name, t in (("pairs.chosen", pairs.chosen), ("pairs.rejected", pairs.rejected)):
        checks.tensor(name, t, dims=2, integral=True)
        if t.numel() == 0 or bool(((t < 0) | (t >= N)).any()):
            raise ValueError(f"{name} must hold at least one index, each in [0, {N}), got shape {tuple(t.shape)}")
    checks.same_shape(**{"pairs.chosen": pairs.chosen, "pairs.rejected": pairs.rejected})
    P, M = pairs.chosen.shape
    flat = (pairs.chosen * N + pairs.rejected).long()  # [P, M] cell index a·N + b
    ones = torch.ones(P, M, dtype=dtype, device=flat.device)
    W = torch.zeros(P, N * N, dtype=dtype, device=flat.device).scatter_add_(1, flat, ones)  # [P, N*N] counts
    return (W / M).view(P, N, N)
