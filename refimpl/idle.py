r"""(G)I-DLE: excluding banned tokens while preserving the rest of the distribution.

Lee (2025, arXiv 2503.18050), "Generative Inference via Distribution-preserving Logit Exclusion",
replaces "set the banned logits to -inf" by the token-level I-projection of the next-token
distribution P onto distributions with no mass on the banned set B,

.. math::  Q(x_t) = \frac{P(x_t \mid x_{<t})\,\mathbb 1[x_t \notin B]}{Z_t},\qquad
           Z_t = \sum_{j \notin B} P(j \mid x_{<t}),

i.e. :math:`\arg\min_Q \mathrm{KL}(Q \,\|\, P)` subject to :math:`Q(B) = 0`. In exact arithmetic
this *is* softmax after -inf masking: the processed scores differ by a per-row constant, so
sampling and greedy decoding are the same method; real implementations differ by where the mask
sits relative to top-k / top-p truncation and by finite fill values. **Beam search** adds up the
processed scores, and ``transformers`` takes the log-softmax *before* the processors: with this
processor the beams accumulate log q(y) = log P(y) - log w(y) (they look for the mode of q); with
-inf masking (``SuppressTokensLogitsProcessor``) log P(y) (the mode of P(y | allowed)), unless
``renormalize_logits=True``, which renormalizes after the processors and makes masking I-DLE. B may
depend on the prefix (a :class:`refimpl.constraints.Constraint`). Over whole completions, token-wise
renormalization samples q(y) = P(y) / w(y) with w(y) = prod_t Z_t, not the KL-optimal
P(y | no banned token) = P(y) 1[y allowed] / P(allowed); the weight w corrects it (importance
resampling with :mod:`refimpl.resample`, SMC with :mod:`refimpl.smc`, or rejection, exact).

transformers facts relied on (checked on 4.56 and 5.x): processors passed as ``generate(logits_processor=
...)`` run after the built-in ones and *before* the sampling warpers (temperature, top-k, top-p,
min-p), in list order, on float32 logits.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from . import checks, constraints, lm, tracking
from .allowed import _rows_per_batch, log_allowed_mass  # noqa: F401 (re-exported)
from .resample import effective_sample_size
from .smc import resample_index

__all__ = ["exclude_and_renormalize", "IDLELogitsProcessor", "NaiveMaskLogitsProcessor", "exact_token_level",
           "log_allowed_mass", "corrected_sample", "Corrected", "rejection_sample", "Rejection"]


def _banned_mask(banned_ids: tuple[int, ...], vocab_size: int, device) -> Tensor:
    """[V] bool, True on banned tokens (built on the host once, then moved)."""
    checks.token_ids("banned_ids", banned_ids, vocab_size)
    if len(banned_ids) == vocab_size:
        raise ValueError("banned_ids bans every token: nothing is left to renormalize")
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[list(banned_ids)] = True
    return mask.to(device)


def _exclude(s: Tensor, banned: Tensor, banned_index: Tensor | None = None) -> Tensor:
    """A copy of ``s`` with -inf on the banned tokens: by index when the banned set is fixed."""
    if banned_index is not None:
        return s.index_fill(-1, banned_index, float("-inf"))
    return s.masked_fill(banned, float("-inf"))


def _renormalize(logits: Tensor, banned: Tensor, banned_index: Tensor | None = None) -> Tensor:
    """log Q = log_softmax over allowed tokens, -inf on banned ones; float32.

    ``banned_index`` (the ids of a fixed [V] mask ``banned``) writes -inf into those columns only,
    one copy of the row and no pass over a mask: cheaper than ``masked_fill`` at a large vocabulary.
    """
    return torch.log_softmax(_exclude(logits.float(), banned, banned_index), dim=-1)  # = log P - log Z_t on allowed


def _no_allowed_row(out: Tensor) -> None:  # raises
    # a row of log-probabilities has a finite maximum (<= 0) unless it is all -inf, or NaN (log_softmax of
    # an all -inf row, or of a NaN or +inf score): one reduction, no [rows, V] temporary
    if bool((~torch.isfinite(out.amax(-1))).any()):
        raise ValueError("a row of scores has no finite allowed token: the ban leaves nothing to sample "
                         "(was the row truncated by an earlier processor?)")


def _log_allowed_share(s: Tensor, banned: Tensor, banned_index: Tensor | None = None) -> Tensor:
    r"""log Z_t = log sum_{j not in B} softmax(s)_j = -softplus(lse_B - lse_allowed), [rows].

    Stable at any Z_t (a banned set holding nearly all the mass included), and with a fixed banned
    set (``banned_index``) the banned log-sum-exp reads only those |B| columns: one pass over the row.
    """
    allowed = _exclude(s, banned, banned_index)
    excluded = s.index_select(-1, banned_index) if banned_index is not None else s.masked_fill(~banned, float("-inf"))
    return -torch.nn.functional.softplus(torch.logsumexp(excluded, -1) - torch.logsumexp(allowed, -1))


def exclude_and_renormalize(logits: Tensor, banned_ids) -> Tensor:
    r"""log Q(x) = log P(x) - log sum_{j not in B} P(j) on allowed x, -inf on banned x.

    Args:
        logits: [..., V] unnormalized next-token scores (any float dtype; -inf allowed).
        banned_ids: banned token ids B (ints, NumPy ints or an integer tensor; may be empty).

    Returns:
        [..., V] float32 log-probabilities. Raises ``ValueError`` if every token is banned, or if
        some row has no finite allowed logit.
    """
    checks.tensor("logits", logits, min_dims=1, floating=True)
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary (last dimension 0): there is no token to renormalize")
    checks.finite("logits", logits, allow_neg_inf=True)
    banned = _banned_mask(checks.token_ids("banned_ids", banned_ids), logits.shape[-1], logits.device)
    out = _renormalize(logits, banned)
    _no_allowed_row(out)
    return out


class IDLELogitsProcessor(LogitsProcessor):
    """I-DLE as a ``transformers`` logits processor: renormalized log-probs, banned = -inf.

    ``banned_ids``: token ids (a fixed B, its mask built once per device and vocabulary size) or a
    :class:`refimpl.constraints.Constraint` (B(y_<t) per row, followed through ``generate`` in every
    decoding mode by a :class:`refimpl.tracking.Tracker`: sampling, greedy, beam search,
    ``num_return_sequences``, assisted and speculative decoding; :meth:`reset` before reusing it on
    prompts that extend an earlier output). Put it before truncation (in ``logits_processor=[...]``,
    generate's own temperature / top-k / top-p after it): the nucleus is then computed on Q, not P.
    Returns the input dtype, computed in float32. A row with no allowed finite score raises
    ``ValueError`` (one boolean read per step; ``check=False`` skips it), except a drafted prefix
    that already took a banned token (assisted decoding verifies it, then rejects it): all -inf.

    With ``track_temperature=T`` it also records log Z_t of the unconstrained softmax(scores / T) at
    every step (no extra forward pass): :meth:`log_allowed_mass` sums them over each completion's
    real tokens. That needs one call per token, rows in a fixed order (sampling, greedy decoding); a
    call that reorders or revisits rows (beam search, assisted decoding) raises ``ValueError``.
    """

    def __init__(self, banned_ids, check: bool = True, track_temperature: float | None = None):
        self.constraint = constraints.as_constraint(banned_ids)
        fixed = isinstance(self.constraint, constraints.BannedTokens)
        self.banned_ids = self.constraint.ids if fixed else None
        self.check = checks.boolean("check", check)
        self.track_temperature = (None if track_temperature is None else
                                  checks.real("track_temperature", track_temperature, low=0.0, low_open=True))
        self._tracker = None if fixed and track_temperature is None else tracking.Tracker(self.constraint)
        self._masks: dict[tuple, Tensor] = {}
        self._indices: dict[tuple, Tensor] = {}  # the ids of each fixed mask, on its device
        self._segments: list[list[Tensor]] = []  # one list of [rows] log Z_t per generate call

    def reset(self) -> None:
        """Forget the sequences seen and the recorded log Z_t."""
        self._segments = []
        if self._tracker is not None:
            self._tracker.reset()

    def banned(self, input_ids: Tensor | None, vocab_size: int, device) -> Tensor:
        """[V] (fixed B, cached per device and vocabulary size) or [rows, V] (a constraint: B(y_<t)
        of each row of ``input_ids``) bool mask of the banned tokens."""
        if self.banned_ids is None:
            return self._tracker.banned(input_ids, vocab_size, device)
        key = (torch.device(device), vocab_size)
        if key not in self._masks:
            mask = _banned_mask(self.banned_ids, vocab_size, device)
            self._masks[key] = mask
            self._indices[key] = mask.nonzero().squeeze(1)  # once per device and vocabulary: no sync per step
        return self._masks[key]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.banned_ids is not None and self._tracker is not None:
            self._tracker.update(input_ids)  # only to tell a new generate call from the next step
        banned = self.banned(input_ids, scores.shape[-1], scores.device)
        index = self._indices.get((scores.device, scores.shape[-1])) if self.banned_ids is not None else None
        out = _renormalize(scores, banned, index)
        dead = None if self.banned_ids is not None else self.constraint.dead(self._tracker.state).to(out.device)
        if dead is not None:  # a drafted prefix that already took a banned token: nothing is allowed
            out = out.masked_fill(dead[:, None], float("-inf"))
        if self.check:
            _no_allowed_row(out if dead is None else out[~dead])
        if self.track_temperature is not None:
            if self._tracker.kind == "other":
                raise ValueError("track_temperature needs one call per generated token with the rows in order "
                                 "(sampling or greedy decoding); this generate reorders or revisits rows (beam "
                                 "search, assisted decoding): compute log w afterwards with idle.log_allowed_mass. "
                                 "If these are new prompts that extend an earlier output, call reset() first")
            if self._tracker.kind == "new":  # a new generate call
                self._segments.append([])
            s = scores.float() if self.track_temperature == 1.0 else scores.float() / self.track_temperature
            self._segments[-1].append(_log_allowed_share(s, banned, index))  # [rows] log Z_t
        return out.to(scores.dtype)

    def log_allowed_mass(self, completion_mask: Tensor) -> Tensor:
        """[B] sum_t log Z_t over each row's real completion tokens, for the rows of the generate
        calls since the processor was made (in order), right-padded to ``completion_mask``'s width."""
        if self.track_temperature is None:
            raise ValueError("this processor does not track log Z_t: pass track_temperature")
        T = checks.tensor("completion_mask", completion_mask, dims=2).shape[1]
        if not self._segments:
            raise ValueError("completion_mask: no generate call has been recorded since the processor was made (or reset)")
        rows = [torch.nn.functional.pad(torch.stack(seg, 1), (0, T - len(seg))) for seg in self._segments]
        log_z = torch.cat(rows)  # [B, T]
        if log_z.shape != completion_mask.shape:
            raise ValueError(f"tracked {tuple(log_z.shape)} (rows, steps) but completion_mask has shape "
                             f"{tuple(completion_mask.shape)}: the processor must have served exactly the "
                             "generate calls (sampling or greedy) of these completions")
        return torch.where(completion_mask.bool(), log_z, torch.zeros_like(log_z)).sum(-1)


class NaiveMaskLogitsProcessor(LogitsProcessor):
    """The common shortcut: overwrite banned scores with a fill value, no renormalization.

    ``fill_value=None`` uses ``finfo(dtype).min``, the finite value many code bases use. Placed
    after top-p, a finite fill samples a banned token whenever truncation removed every allowed
    token; ``fill_value=-inf`` turns the same row into NaN probabilities.
    """

    def __init__(self, banned_ids, fill_value: float | None = None):
        self._idle = IDLELogitsProcessor(banned_ids)  # token ids or a Constraint
        self.banned_ids = self._idle.banned_ids
        if fill_value is not None and fill_value != float("-inf"):
            fill_value = checks.real("fill_value", fill_value, high=0.0)  # a finite fill, or -inf
        self.fill_value = fill_value

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        banned = self._idle.banned(input_ids, scores.shape[-1], scores.device)
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
    checks.nonempty("logp", checks.tensor("logp", logp, dims=2, floating=True))
    checks.finite("logp", logp, allow_neg_inf=True)
    V = checks.integer("vocab_size", vocab_size, low=2)
    P, N = logp.shape
    L = round(math.log(N) / math.log(V))
    if V**L != N:
        raise ValueError(f"logp has {N} columns, not a power of vocab_size={V}")
    banned = _banned_mask(checks.token_ids("banned_ids", banned_ids), V, logp.device)
    joint = logp.reshape(P, *([V] * L))  # [P, V, ..., V]
    log_q = torch.zeros_like(joint)
    log_w = torch.zeros_like(joint)
    prev = torch.zeros(P, *([1] * L), device=logp.device, dtype=logp.dtype)  # log P(empty prefix)
    for t in range(L):
        # Marginal of the prefix y_<=t: sum out the later positions.
        marg = torch.logsumexp(joint, dim=tuple(range(t + 2, L + 1))) if t < L - 1 else joint
        marg = marg.reshape(P, *([V] * (t + 1)), *([1] * (L - t - 1)))  # [P, V..(t+1).., 1...]
        # log P(y_t | y_<t), broadcast over later positions; -inf after a prefix of probability 0
        cond = torch.where(torch.isneginf(prev), torch.full_like(marg, float("-inf")), marg - prev)
        cond_allowed = cond.masked_fill(banned.reshape(*([1] * (t + 1)), V, *([1] * (L - t - 1))),
                                        float("-inf"))
        log_Z = torch.logsumexp(cond_allowed, dim=t + 1, keepdim=True)  # [P, ..prefix.., 1, ...]
        if bool((torch.isneginf(log_Z) & ~torch.isneginf(log_q)).any()):
            raise ValueError("logp has a prefix of positive probability under q whose allowed continuations "
                             "all have probability 0: token-level renormalization is undefined there")
        log_q = log_q + torch.where(torch.isneginf(cond_allowed), cond_allowed, cond_allowed - log_Z)
        log_w = log_w + log_Z
        prev = marg
    return log_q.reshape(P, N), log_w.expand_as(joint).reshape(P, N)


class Corrected(NamedTuple):
    """Output of :func:`corrected_sample`."""
    samples: lm.Samples  # B·n resampled rows, prompt-major (n per prompt)
    log_w: Tensor  # [B, n, k] log importance weights of the particles
    ess: Tensor  # [B, n] effective sample size of each group of k


def corrected_sample(model, tokenizer, prompts: Sequence[str], banned_ids, k: int = 8, n: int = 1,
                     max_new_tokens: int = 16, temperature: float = 1.0, seed: int | None = 0) -> Corrected:
    r"""Sequence-level correction of I-DLE by importance resampling (SIR).

    1. Draw n·k token-level (renormalized) samples per prompt: y_j ~ q, recording log Z_t.
    2. Weight each by w_j = prod_t Z_t -- proportional to P(y)/q(y).
    3. For each of the n groups of k, resample one y_j with probability w_j / sum_i w_i.

    As k grows the output tends to ``P_T(y | no banned token)`` (bias O(1/k)). Sampling uses no
    truncation (the correction targets the untruncated law).

    Returns:
        :class:`Corrected`.
    """
    k = checks.integer("k", k, low=1)
    n = checks.integer("n", n, low=1)
    temperature = checks.real("temperature", temperature, low=0.0, low_open=True)
    proc = IDLELogitsProcessor(banned_ids, track_temperature=temperature)
    s = lm.sample(model, tokenizer, prompts, k=n * k, max_new_tokens=max_new_tokens,
                  temperature=temperature, logits_processor=[proc], seed=seed)
    B = len(prompts)
    log_w = proc.log_allowed_mass(s.completion_mask).view(B, n, k)  # [B*n*k] -> [B, n, k]
    g = torch.Generator(device=log_w.device).manual_seed(0 if seed is None else seed + 1)
    pick = resample_index(log_w, g)  # [B, n]
    rows = (torch.arange(B * n, device=log_w.device).view(B, n) * k + pick).reshape(-1)  # [B*n]
    return Corrected(s.rows(rows, k=n), log_w, effective_sample_size(log_w))


class Rejection(NamedTuple):
    """Output of :func:`rejection_sample`."""
    samples: lm.Samples  # all B·k unconstrained rows
    accepted: Tensor  # [B*k] bool: rows with no banned token among their real tokens


def rejection_sample(model, tokenizer, prompts: Sequence[str], banned_ids, k: int = 8,
                     max_new_tokens: int = 16, temperature: float = 1.0, seed: int | None = 0) -> Rejection:
    r"""Exact ``P(y | no banned token)``: draw k unconstrained samples per prompt, keep the allowed
    (those whose every real token y_t lies outside B(x, y_<t))."""
    c = constraints.as_constraint(banned_ids)
    s = lm.sample(model, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return Rejection(s, ~constraints.violations(c, s.prompt_ids, s.completion_ids, s.completion_mask,
                                                lm._vocab_size(model), prompt_mask=s.prompt_mask))
