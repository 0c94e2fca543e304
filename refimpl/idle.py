r"""(G)I-DLE: excluding banned tokens while preserving the rest of the distribution.

Lee (2025, arXiv 2503.18050) replaces "set the banned logits to -inf" by the token-level
I-projection of the next-token distribution P onto distributions with no mass on the banned set B,

.. math::  Q(x_t) = \frac{P(x_t \mid x_{<t})\,\mathbb 1[x_t \notin B]}{Z_t},\qquad
           Z_t = \sum_{j \notin B} P(j \mid x_{<t}),

i.e. :math:`\arg\min_Q \mathrm{KL}(Q \,\|\, P)` subject to :math:`Q(B) = 0`. In exact arithmetic
this *is* softmax after -inf masking; real implementations differ by where the mask sits relative to top-k / top-p truncation
and by finite fill values. Over whole completions, token-wise renormalization samples
``q(y) = P(y) / prod_t Z_t``, not the KL-optimal ``P(y | no banned token) = P(y) 1[y allowed] / P(allowed)``;
the importance weight ``w(y) = prod_t Z_t = P(y) / q(y)`` corrects it (importance resampling,
or rejection as the exact reference).

transformers facts relied on (checked on transformers 5.x): processors passed as
``generate(logits_processor=...)`` are appended after the built-in processors and *before* the
sampling warpers (temperature, top-k, top-p, min-p), in list order; a user processor of the same
type as a built-in one replaces it in place; ``_sample`` casts the logits to float32 before the
processors run. So ``do_sample=True, top_p=1.0, top_k=0, temperature=1.0`` disables the built-in
warpers and ``logits_processor=[TemperatureLogitsWarper(T), TopPLogitsWarper(p), mask]`` applies
the mask *after* truncation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from . import lm

__all__ = [
    "exclude_and_renormalize",
    "IDLELogitsProcessor",
    "NaiveMaskLogitsProcessor",
    "exact_token_level",
    "log_allowed_mass",
    "corrected_sample",
    "rejection_sample",
    "sir_distribution",
]


def _banned_tuple(banned_ids) -> tuple[int, ...]:
    if isinstance(banned_ids, Tensor):
        banned_ids = banned_ids.reshape(-1).tolist()
    if isinstance(banned_ids, (str, bytes)) or not isinstance(banned_ids, (Sequence, set, frozenset)):
        raise TypeError(f"banned_ids must be a sequence of token ids, got {type(banned_ids).__name__}")
    ids = tuple(sorted(set(banned_ids)))
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError("banned_ids must contain ints")
    if any(i < 0 for i in ids):
        raise ValueError(f"banned_ids must be non-negative token ids, got {ids}")
    return ids


def _banned_mask(banned_ids: tuple[int, ...], vocab_size: int, device) -> Tensor:
    """[V] bool, True on banned tokens (built on the host once, then moved)."""
    if any(i >= vocab_size for i in banned_ids):
        raise ValueError(f"banned_ids {banned_ids} out of range for a vocabulary of {vocab_size}")
    if len(banned_ids) == vocab_size:
        raise ValueError("banned_ids bans every token: nothing is left to renormalize")
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[list(banned_ids)] = True
    return mask.to(device)


def _renormalize(logits: Tensor, banned: Tensor) -> Tensor:
    """log Q = log_softmax over allowed tokens, -inf on banned ones; float32."""
    masked = logits.float().masked_fill(banned, float("-inf"))  # [..., V]
    return torch.log_softmax(masked, dim=-1)  # = log P - log Z_t on allowed tokens


def exclude_and_renormalize(logits: Tensor, banned_ids) -> Tensor:
    r"""log Q(x) = log P(x) - log sum_{j not in B} P(j) on allowed x, -inf on banned x.

    Args:
        logits: [..., V] unnormalized next-token scores (any float dtype).
        banned_ids: sequence of banned token ids B (may be empty: plain log_softmax).

    Returns:
        [..., V] float32 log-probabilities.

    Raises:
        ValueError if every token is banned, or if some row has no finite allowed logit.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    banned = _banned_mask(_banned_tuple(banned_ids), logits.shape[-1], logits.device)
    out = _renormalize(logits, banned)
    if torch.isnan(out).any():
        raise ValueError("logits has a row where every allowed token is -inf")
    return out


class IDLELogitsProcessor(LogitsProcessor):
    """I-DLE as a ``transformers`` logits processor: renormalized log-probs, banned = -inf.

    Put it before truncation (pass it in ``generate(logits_processor=[...])`` and let generate
    apply temperature / top-k / top-p): the nucleus is then computed on Q, not on P. The mask is
    built once per (device, vocabulary size) and cached, so a decoding step does no host sync.
    Returns the input dtype (fp32 / fp16 / bf16); the arithmetic is done in float32.
    """

    def __init__(self, banned_ids):
        self.banned_ids = _banned_tuple(banned_ids)
        self._masks: dict[tuple, Tensor] = {}

    def mask(self, vocab_size: int, device) -> Tensor:
        key = (torch.device(device), vocab_size)
        if key not in self._masks:
            self._masks[key] = _banned_mask(self.banned_ids, vocab_size, device)
        return self._masks[key]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        banned = self.mask(scores.shape[-1], scores.device)
        return _renormalize(scores, banned).to(scores.dtype)


class NaiveMaskLogitsProcessor(IDLELogitsProcessor):
    """The common shortcut: overwrite banned scores with a fill value, no renormalization.

    ``fill_value=None`` uses ``finfo(dtype).min``, the finite value many code bases use. Placed
    after top-p, a finite fill samples a banned token whenever truncation removed every allowed
    token; ``fill_value=-inf`` turns the same row into NaN probabilities.
    """

    def __init__(self, banned_ids, fill_value: float | None = None):
        super().__init__(banned_ids)
        self.fill_value = fill_value

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        banned = self.mask(scores.shape[-1], scores.device)
        fill = torch.finfo(scores.dtype).min if self.fill_value is None else self.fill_value
        return scores.masked_fill(banned, fill)


def exact_token_level(logp: Tensor, vocab_size: int, banned_ids) -> tuple[Tensor, Tensor]:
    r"""Token-level I-DLE over a fully enumerated support of fixed-length sequences.

    Args:
        logp: [P, V^L] exact log P(y) of every length-L sequence, base-V order
            (``itertools.product(range(V), repeat=L)``).
        vocab_size: V.
        banned_ids: banned token ids B.

    Returns:
        ``(log_q, log_w)``, both [P, V^L]: ``log q(y) = sum_t [log P(y_t | y_<t) - log Z_t]``
        (-inf when y contains a banned token) and ``log w(y) = sum_t log Z_t(y_<t)``.
    """
    P, N = logp.shape
    V = vocab_size
    L = round(math.log(N) / math.log(V))
    if V**L != N:
        raise ValueError(f"logp has {N} columns, not a power of vocab_size={V}")
    banned = _banned_mask(_banned_tuple(banned_ids), V, logp.device)
    joint = logp.reshape(P, *([V] * L))  # [P, V, ..., V]
    log_q = torch.zeros_like(joint)
    log_w = torch.zeros_like(joint)
    prev = torch.zeros(P, *([1] * L), device=logp.device, dtype=logp.dtype)  # log P(empty prefix)
    for t in range(L):
        # Marginal of the prefix y_<=t: sum out the later positions.
        marg = torch.logsumexp(joint, dim=tuple(range(t + 2, L + 1))) if t < L - 1 else joint
        marg = marg.reshape(P, *([V] * (t + 1)), *([1] * (L - t - 1)))  # [P, V..(t+1).., 1...]
        cond = marg - prev  # log P(y_t | y_<t), broadcast over later positions
        cond_allowed = cond.masked_fill(banned.reshape(*([1] * (t + 1)), V, *([1] * (L - t - 1))),
                                        float("-inf"))
        log_Z = torch.logsumexp(cond_allowed, dim=t + 1, keepdim=True)  # [P, ..prefix.., 1, ...]
        log_q = log_q + cond_allowed - log_Z
        log_w = log_w + log_Z
        prev = marg
    return log_q.reshape(P, N), log_w.expand_as(joint).reshape(P, N)


@torch.no_grad()
def log_allowed_mass(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                     completion_mask: Tensor, banned_ids, temperature: float = 1.0) -> Tensor:
    r"""log w(y) = sum_t log Z_t over real completion tokens, from one forward pass.

    Z_t is the allowed mass of the *unconstrained* next-token distribution softmax(logits / T)
    at step t (the stop token's step included), i.e. ``w(y) = P_T(y) / q(y)``.

    Returns:
        [B] float32.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    P = prompt_ids.shape[1]
    logits = lm.forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits
    logits = logits[:, P - 1 : -1, :].float() / temperature  # [B, T, V] predicts completion token t
    banned = _banned_mask(_banned_tuple(banned_ids), logits.shape[-1], logits.device)
    logp = torch.log_softmax(logits, dim=-1)
    log_Z = torch.logsumexp(logp.masked_fill(banned, float("-inf")), dim=-1)  # [B, T]
    return (log_Z * completion_mask.to(log_Z.dtype)).sum(-1)


def corrected_sample(model, tokenizer, prompts: Sequence[str], banned_ids, k: int = 8, n: int = 1,
                     temperature: float = 1.0, max_new_tokens: int = 16, seed: int | None = 0):
    r"""Sequence-level correction of I-DLE by importance resampling (SIR).

    1. Draw n·k token-level (renormalized) samples per prompt: y_j ~ q.
    2. Weight each by w_j = prod_t Z_t (:func:`log_allowed_mass`) -- proportional to P(y)/q(y).
    3. For each of the n groups of k, resample one y_j with probability w_j / sum_i w_i.

    As k grows the output tends to ``P(y | no banned token)`` (bias O(1/k)).

    Returns:
        ``(samples, info)``: :class:`refimpl.lm.Samples` with B·n rows (prompt-major) and a dict
        with ``idle/log_w`` [B, n, k] and ``idle/ess`` [B, n] (effective sample size).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    proc = IDLELogitsProcessor(banned_ids)
    s = lm.sample(model, tokenizer, prompts, k=n * k, max_new_tokens=max_new_tokens,
                  temperature=temperature, logits_processor=[proc], seed=seed)
    log_w = log_allowed_mass(model, s.prompt_ids, s.prompt_mask, s.completion_ids,
                             s.completion_mask, proc.banned_ids, temperature)
    B = len(prompts)
    log_w = log_w.view(B, n, k)  # [B*n*k] -> [B, n, k], prompt-major then group
    g = torch.Generator(device=log_w.device).manual_seed(0 if seed is None else seed + 1)
    pick = torch.multinomial(torch.softmax(log_w, -1).view(B * n, k), 1, generator=g).view(B, n)
    rows = (torch.arange(B * n, device=log_w.device).view(B, n) * k + pick).reshape(-1)  # [B*n]
    ess = torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))  # [B, n]
    out = lm.Samples(s.prompt_ids[rows], s.prompt_mask[rows], s.completion_ids[rows],
                     s.completion_mask[rows], [s.texts[i] for i in rows.tolist()],
                     s.prompt_index[rows], n)
    return out, {"idle/log_w": log_w, "idle/ess": ess}


def rejection_sample(model, tokenizer, prompts: Sequence[str], banned_ids, k: int = 8,
                     temperature: float = 1.0, max_new_tokens: int = 16, seed: int | None = 0):
    r"""Exact ``P(y | no banned token)``: draw k unconstrained samples per prompt, keep the allowed.

    Returns:
        ``(samples, accepted)``: all k·B :class:`refimpl.lm.Samples` rows and a [B*k] bool mask
        of the accepted ones (those with no banned token among their real tokens).
    """
    s = lm.sample(model, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens,
                  temperature=temperature, seed=seed)
    banned = torch.tensor(_banned_tuple(banned_ids), device=s.completion_ids.device)
    hit = torch.isin(s.completion_ids, banned) & s.completion_mask.bool()  # [B*k, T]
    return s, ~hit.any(-1)


def sir_distribution(log_q: Tensor, log_w: Tensor, k: int, n_mc: int = 4096,
                     generator: torch.Generator | None = None) -> Tensor:
    r"""The output law of importance resampling with k particles, nearly exactly.

    P_k(y) = q(y) w(y) E[ k / (w(y) + S) ],  S = sum of k-1 i.i.d. weights under q,
    with the expectation estimated from ``n_mc`` draws of S (shared across y).

    Args:
        log_q: [P, N] proposal log-probs; log_w: [P, N] log importance weights.

    Returns:
        [P, N] probabilities (rows sum to about one).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    w = torch.exp(log_w - log_w.masked_fill(log_q == float("-inf"), float("-inf")).amax(-1, keepdim=True))
    w = w.masked_fill(log_q == float("-inf"), 0.0)  # [P, N] weights scaled to max 1
    q = torch.exp(log_q)
    if k == 1:
        return q
    idx = torch.multinomial(q, n_mc * (k - 1), replacement=True, generator=generator)  # [P, n_mc*(k-1)]
    S = w.gather(1, idx).view(-1, n_mc, k - 1).sum(-1)  # [P, n_mc]
    expect = (k / (w.unsqueeze(-1) + S.unsqueeze(1))).mean(-1)  # [P, N]
    return q * w * expect
