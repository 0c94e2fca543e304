r"""Sequential Monte Carlo (SMC) over tokens, for any causal LM with a KV cache.

Target: a law over completions known up to a constant through per-token factors,
π(y | x) ∝ Π_t γ_t(y_t | x, y_<t). Each of k particles per prompt draws y_t from a proposal
q_t(· | x, y_<t) and its log weight grows by the incremental weight

.. math::  \log w \mathrel{+}= \log \gamma_t(y_t) - \log q_t(y_t).

When the effective sample size ESS = (Σ w)² / Σ w² of a prompt's particles drops below
``ess_threshold · k`` they are resampled (multinomial or systematic) and their weights reset to
the mean, so the product of mean weights stays an unbiased estimate Ẑ of the normalizing
constant Z = Σ_y Π_t γ_t (Del Moral 2004; for language models: Lew et al. 2023, arXiv 2306.03081;
Zhao et al. 2024, twisted SMC, arXiv 2404.17546). ``ess_threshold=0`` never resamples: weighting
k independent proposals and resampling once at the end is importance resampling, as
:func:`refimpl.idle.corrected_sample` does; 1 resamples at every step. With ``adapted=True`` the
particles are weighted by Z_t = Σ_v γ_t(v), known *before* y_t is drawn, and resampled on it; the
draw then adds log γ_t(y_t) - log q_t(y_t) - log Z_t, which is 0 when q_t ∝ γ_t (the fully adapted
filter of Pitt & Shephard 1999: no weight is spent on a token already drawn).

A *step* object supplies the factors: ``start(prompt_ids) -> state``, ``step(state, logits) ->``
:class:`StepLogits` (log q_t and log γ_t over the vocabulary, [N, V]) and ``advance(state, tokens)
-> state``; states are tensors (or tuples of tensors) with one row per particle, reindexed on
resampling like the KV cache. :class:`ConstrainedStep` is (G)I-DLE's: q_t = the renormalized
allowed distribution, γ_t = P_T · 1[allowed], so the increment is log Z_t and π = P_T(y | allowed)
(Lee 2025, arXiv 2503.18050). A twisted step, γ_t(v) = P(v | y_<t) ψ_t(y_<t v) / ψ_{t-1}(y_<t),
targets π* ∝ P exp(r / β) when ψ_L = exp(r / β) (:func:`soft_values`, :func:`guided_law`, :class:`TwistedStep`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import checks, constraints, lm
from .particles import _resample_low_ess, ancestors, resample_index
from .sampling import TINY_TEMPERATURE, Samples, _context_length, completion_mask, padding_side

__all__ = ["StepLogits", "ConstrainedStep", "SMCResult", "smc", "resample_index", "ancestors", "soft_values",
           "guided_law", "TwistedStep"]


class StepLogits(NamedTuple):
    """What a step gives for every particle at one position."""

    log_q: Tensor  # [N, V] proposal log-probabilities (normalized over the vocabulary)
    log_gamma: Tensor  # [N, V] log target factors γ_t (unnormalized; -inf: no target mass)


class ConstrainedStep:
    r"""(G)I-DLE as an SMC step: log γ_t = log P_T masked to the allowed set, log q_t = log γ_t - log Z_t.

    ``banned_ids``: token ids or a :class:`refimpl.constraints.Constraint`; ``temperature`` T > 0
    applies to both (P_T = softmax(logits / T)). With nothing banned q = γ = P_T: plain sampling.
    """

    def __init__(self, banned_ids, temperature: float = 1.0):
        self.constraint = constraints.as_constraint(banned_ids)
        self.temperature = checks.real("temperature", temperature, low=0.0, low_open=True)

    def start(self, prompt_ids: Tensor) -> Tensor:
        return self.constraint.start(prompt_ids)

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:
        return self.constraint.advance(state, tokens)

    def __call__(self, state: Tensor, logits: Tensor) -> StepLogits:
        logits, banned = logits.float(), self.constraint.banned(state, logits.shape[-1], logits.device)
        if self.temperature < TINY_TEMPERATURE:  # logits / T could overflow: shift the (allowed) maximum to 0 first
            allowed = logits.masked_fill(banned, float("-inf"))  # q from it: P_T(allowed) may underflow to 0
            log_q = torch.log_softmax((allowed - allowed.amax(-1, keepdim=True)) / self.temperature, -1)
            log_p = torch.log_softmax((logits - logits.amax(-1, keepdim=True)) / self.temperature, -1)
            return StepLogits(log_q, log_p.masked_fill(banned, float("-inf")))
        log_gamma = torch.log_softmax(logits if self.temperature == 1.0 else logits / self.temperature, -1)
        log_gamma = log_gamma.masked_fill_(banned, float("-inf"))  # [N, V], in place: log_softmax's own output
        return StepLogits(torch.log_softmax(log_gamma, -1), log_gamma)


@dataclass
class SMCResult:
    """The final particle system of :func:`smc` (k particles per prompt, prompt-major)."""

    samples: Samples  # B·k particles (completions right-padded, stop token included)
    log_w: Tensor  # [B, k] final log weights (their self-normalized weights estimate the target)
    log_z: Tensor  # [B] log Ẑ, unbiased estimate of Z (for a ban: P_T(allowed))
    logp: Tensor  # [B*k] log P(y | x) of each particle under the model (temperature 1)
    logq: Tensor  # [B*k] Σ_t log q_t(y_t) along each particle's path
    ess: Tensor  # [B, steps] ESS after weighting at each step (before any resampling)
    resampled: Tensor  # [B, steps] bool: the prompt's particles were resampled at that step
    distinct: Tensor  # [B, steps] distinct prefixes y_≤t among a prompt's k particles after step t

    @property
    def n_resamples(self) -> Tensor:
        """[B] number of resampling events per prompt."""
        return self.resampled.sum(-1)

    def draw(self, n: int = 1, seed: int | None = 0) -> Samples:
        """n completions per prompt drawn from the weighted particles (the final resampling)."""
        n = checks.integer("n", n, low=1)
        B, k = self.log_w.shape
        g = torch.Generator(device=self.log_w.device).manual_seed(0 if seed is None else seed)
        pick = resample_index(self.log_w[:, None, :].expand(B, n, k), g)  # [B, n]
        return self.samples.rows((torch.arange(B, device=pick.device)[:, None] * k + pick).reshape(-1), k=n)


def _take(state, index: Tensor):
    """Rows ``index`` of a state or a KV cache: a tensor, a transformers ``Cache`` (reordered in place), or
    a (nested) tuple / list of them (as the legacy cache format)."""
    if isinstance(state, Tensor):
        return state[index.to(state.device)]
    if callable(getattr(state, "reorder_cache", None)):  # the Cache classes of every supported transformers
        state.reorder_cache(index)
        return state
    return type(state)(_take(s, index) for s in state)


def _kv_cache(out) -> tuple[str, object]:
    """The output's KV cache and the keyword that passes it back: ``cache`` (newest transformers), else
    ``past_key_values`` (the newest accepts it too, with a warning)."""
    name = "cache" if "cache" in getattr(out, "__dataclass_fields__", ()) else "past_key_values"
    if getattr(out, name, None) is None:
        raise ValueError(f"the model ({type(out).__name__}) returned no KV cache")
    return name, getattr(out, name)


@torch.no_grad()
def smc(model, tokenizer, prompts: Sequence[str], step, k: int = 8, max_new_tokens: int = 16,
        ess_threshold: float = 0.5, resampling: str = "systematic", adapted: bool = False,
        seed: int | None = 0) -> SMCResult:
    r"""Run SMC with k particles per prompt (KV cache on, reordered on resampling).

    Args:
        prompts: B prompt texts.
        step: the factors (see the module docstring), e.g. :class:`ConstrainedStep`.
        k: particles per prompt.
        ess_threshold: resample a prompt's particles when ESS < ess_threshold · k (0: never;
            1: at every step).
        resampling: ``"systematic"`` or ``"multinomial"``.
        adapted: weight by Z_t = Σ_v γ_t(v) and resample before drawing y_t (see above).
        seed: seeds the global RNG inside (restored afterwards); the draws of y_t consume it as
            ``generate`` does, so with nothing banned and no resampling the particles are
            ``lm.sample``'s completions for the same seed (one generate call: batch_size >= B·k).

    Returns:
        :class:`SMCResult`. Completions stop at the model's stop token; later positions are
        padding and no longer change the weights.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a causal LM (a torch.nn.Module), got {type(model).__name__}")
    prompts = checks.strings("prompts", prompts)
    k = checks.integer("k", k, low=1)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    ess_threshold = checks.real("ess_threshold", ess_threshold, low=0.0, high=1.0)
    checks.choice("resampling", resampling, ("multinomial", "systematic"))
    adapted = checks.boolean("adapted", adapted)
    seed = None if seed is None else checks.integer("seed", seed, low=0)
    if not all(callable(getattr(step, m, None)) for m in ("start", "advance", "__call__")):
        raise TypeError(f"step must have start(prompt_ids), advance(state, tokens) and __call__(state, logits), "
                        f"got {type(step).__name__}")
    device = next(model.parameters()).device
    gen = model.generation_config
    eos = torch.tensor(checks.token_ids("eos_token_id", [] if gen.eos_token_id is None else
                                        torch.as_tensor(gen.eos_token_id).reshape(-1)), device=device, dtype=torch.long)
    pad = next((p for p in (gen.pad_token_id, tokenizer.pad_token_id, *eos.tolist()) if p is not None), 0)
    with padding_side(tokenizer, "left"):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    n_ctx = _context_length(model)
    if n_ctx is not None and enc["input_ids"].shape[1] + max_new_tokens > n_ctx:
        raise ValueError(f"the longest prompt ({enc['input_ids'].shape[1]} tokens) plus max_new_tokens="
                         f"{max_new_tokens} exceeds the model's context of {n_ctx}")
    if bool((enc["attention_mask"].sum(1) == 0).any()):
        raise ValueError("prompts must not tokenize to nothing")
    B, N = len(prompts), len(prompts) * k
    ids, attn = enc["input_ids"].repeat_interleave(k, 0), enc["attention_mask"].repeat_interleave(k, 0)  # [N, P]
    state, tokens, h = step.start(ids), ids.new_zeros(N, 0), torch.zeros(N, dtype=torch.long, device=device)
    log_w, logp, logq = (torch.zeros(N, device=device) for _ in range(3))
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    trace = []  # (ESS, resampled, distinct) [B] each, per step
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        keep = lm._one_logit(model)  # the output layer on the last position only (the prefill's prompt included)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
        for t in range(max_new_tokens):
            kv, cache = _kv_cache(out)
            logits = out.logits[:, -1].float()  # [N, V]
            log_q, log_gamma = step(state, logits)
            log_zt = torch.logsumexp(log_gamma, -1)  # [N] log Σ_v γ_t(v); -inf when nothing has target mass
            if bool((torch.isneginf(log_zt) & ~finished).any()):
                raise ValueError(f"at step {t} a particle has no token with positive target mass (everything is banned)")
            log_zt = torch.where(finished, torch.zeros_like(log_w), log_zt)
            if adapted:  # the draw's weight is known before the draw: weight on it, resample, then draw
                ess, need, log_w, index = _resample_low_ess(log_w + log_zt, B, k, ess_threshold, resampling)
                if index is not None:
                    state, tokens, h, logp, logq, finished, cache, logits, log_q, log_gamma, log_zt = _take(
                        (state, tokens, h, logp, logq, finished, cache, logits, log_q, log_gamma, log_zt), index)
            safe = log_q.masked_fill(finished[:, None], 0.0)  # finished rows: any draw
            y = torch.multinomial(torch.softmax(safe, -1), 1).squeeze(1)  # [N]
            y = torch.where(finished, torch.full_like(y, pad), y)
            live, col = ~finished, y[:, None]
            inc = log_gamma.gather(1, col).squeeze(1) - log_q.gather(1, col).squeeze(1) - (log_zt if adapted else 0)
            log_w = log_w + torch.where(live, inc, torch.zeros_like(inc))
            lp = logits.gather(1, col).squeeze(1) - torch.logsumexp(logits, -1)  # log P(y_t), no [N, V] copy
            logp = logp + torch.where(live, lp, torch.zeros_like(lp))
            logq = logq + torch.where(live, log_q.gather(1, col).squeeze(1), torch.zeros_like(logq))
            state, tokens = step.advance(state, y), torch.cat([tokens, y[:, None]], 1)
            h = h * 1_000_003 + y + 1  # a 64-bit hash of the prefix (wraps around), to count distinct ones
            finished = finished | torch.isin(y, eos)
            if bool(torch.isneginf(log_w.view(B, k)).all(-1).any()):
                raise ValueError(f"at step {t} every particle of a prompt has weight 0: the proposal q_t puts "
                                 "mass where the target γ_t has none")
            if not adapted:
                ess, need, log_w, index = _resample_low_ess(log_w, B, k, ess_threshold, resampling)
                if index is not None:
                    state, tokens, h, logp, logq, finished, cache = _take((state, tokens, h, logp, logq, finished, cache), index)
            hs = h.view(B, k).sort(-1).values
            trace.append((ess, need, (hs[:, 1:] != hs[:, :-1]).sum(-1) + 1))
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones(N, 1)], 1)
            out = model(input_ids=tokens[:, -1:], attention_mask=attn, position_ids=attn.sum(1, keepdim=True) - 1,
                        use_cache=True, **{kv: cache}, **keep)
    cmask = completion_mask(tokens, eos.tolist() or None)
    stops = set(eos.tolist())
    texts = tokenizer.batch_decode([[a for a, m in zip(r, mr) if m and a not in stops] for r, mr in
                                    zip(tokens.tolist(), cmask.tolist())], skip_special_tokens=True)
    samples = Samples(ids, enc["attention_mask"].repeat_interleave(k, 0), tokens, cmask, texts,
                      torch.arange(B, device=device).repeat_interleave(k), k)
    lw = log_w.view(B, k)
    ess, resampled, distinct = (torch.stack(x, 1) for x in zip(*trace))
    return SMCResult(samples, lw, torch.logsumexp(lw, -1) - math.log(k), logp, logq, ess, resampled, distinct)


def soft_values(logp: Tensor, reward: Tensor, beta: float, vocab_size: int) -> list[Tensor]:
    r"""log ψ_t(y_≤t) = log E_{y~p}[exp(r(y)/β) | y_≤t], t = 0..L: [P, V^t] each; ψ_L = exp(r/β) (known).

    ``logp`` [P, V^L] (base-V order, ``-inf``: p = 0), ``reward`` [P, V^L]. With p the model's law:
    the exact twist (the soft value; Zhao et al. 2024). With p the empirical law of samples (log
    counts/M): its Monte Carlo estimate, a learned value (controlled decoding, Mudgal et al. 2024); an
    unvisited prefix takes its parent's value.
    """
    L, V, beta = _depth(logp, vocab_size), vocab_size, checks.beta(beta)
    checks.same_device(logp=logp, reward=checks.tensor("reward", reward, floating=True))
    checks.same_shape(logp=logp, reward=reward)
    checks.finite("logp", logp, allow_neg_inf=True), checks.finite("reward", reward, allow_neg_inf=True)
    if logp.dtype in (torch.float16, torch.bfloat16):  # r / beta in half precision overflows from 6e4
        logp, reward = logp.float(), reward.float()
    P, a, out = logp.shape[0], logp + reward / beta, []  # a: [P, V^L]
    if bool(torch.isposinf(a).any()):
        raise ValueError(f"reward / beta overflows {a.dtype} (beta = {beta:g}): use float64 tensors")
    if bool(torch.isneginf(logp).all(-1).any()) or bool(torch.isneginf(a).all(-1).any()):
        raise ValueError("logp and reward leave a prompt with no mass (logp + reward / beta is -inf on a row)")
    for t in range(L):
        num, den = (torch.logsumexp(x.view(P, V**t, -1), -1) for x in (a, logp))  # [P, V^t]: over suffixes
        out.append(torch.where(torch.isneginf(den), out[-1].repeat_interleave(V, 1), num - den) if t else num - den)
    return out + [reward / beta]


def guided_law(logp: Tensor, log_psi: Sequence[Tensor], vocab_size: int) -> Tensor:
    r"""[P, V^L] log q(y) = Σ_t log q_t(y_t | y_<t), q_t(v | y_<t) ∝ P(v | y_<t)·ψ_t(y_<t v): guidance.

    ``logp`` [P, V^L] finite log P, ``log_psi`` L + 1 tensors [P, V^t] (ψ_0 unused); q = π* for the exact twist."""
    L, V = _depth(logp, vocab_size), vocab_size
    if isinstance(log_psi, (str, bytes, Tensor)) or not isinstance(log_psi, Sequence) or \
            not all(isinstance(p, Tensor) for p in log_psi):
        raise TypeError(f"log_psi must be a list of tensors (one per depth), got {type(log_psi).__name__}")
    shapes = [(logp.shape[0], V**t) for t in range(L + 1)]
    checks.same_device(logp=logp, **{f"log_psi[{t}]": p for t, p in enumerate(log_psi)})
    if not bool(torch.isfinite(logp).all()) or [tuple(p.shape) for p in log_psi] != shapes:
        raise ValueError(f"logp must be finite and log_psi {L + 1} tensors of shapes [P, V^t], t = 0..{L}")
    for t, p in enumerate(log_psi[1:], 1):
        checks.finite(f"log_psi[{t}]", checks.tensor(f"log_psi[{t}]", p, floating=True), allow_neg_inf=True)
        if bool(torch.isneginf(p).all(-1).any()):
            raise ValueError(f"log_psi[{t}] is -inf on every prefix of a prompt: guidance has nowhere to go")
    P, log_q = logp.shape[0], torch.zeros_like(logp)
    marg = [torch.logsumexp(logp.view(P, V**t, -1), -1) for t in range(L + 1)]  # log P(y_≤t): [P, V^t]
    for t in range(1, L + 1):
        s = marg[t] - marg[t - 1].repeat_interleave(V, 1) + log_psi[t]  # [P, V^t]: log P(v | y_<t) ψ_t
        s = s - torch.logsumexp(s.view(P, -1, V), -1).repeat_interleave(V, 1).clamp(min=torch.finfo(s.dtype).min)
        log_q = log_q + s.repeat_interleave(V ** (L - t), 1)  # [P, V^L]
    return log_q


def _depth(logp: Tensor, V: int) -> int:  # L, for logp [P, V^L]
    N, V = checks.tensor("logp", logp, dims=2, floating=True).shape[1], checks.integer("vocab_size", V, low=2)
    checks.nonempty("logp", logp)
    if V ** round(math.log(N) / math.log(V)) != N:
        raise ValueError(f"logp must have V^L columns (vocab_size V = {V}), got shape {tuple(logp.shape)}")
    return round(math.log(N) / math.log(V))


class TwistedStep:
    """SMC step γ_t(v) = P(v | y_<t) ψ_t(y_<t v) / ψ_{t-1}(y_<t), q_t ∝ P ψ_t; ``log_psi`` from
    :func:`soft_values`, its rows those of the prompts ``prompt_ids`` [P, T]. State: (row, t, prefix code)."""

    def __init__(self, log_psi: Sequence[Tensor], prompt_ids: Tensor):
        ok = isinstance(log_psi, Sequence) and not isinstance(log_psi, (str, bytes, Tensor)) and len(log_psi) >= 2
        if not ok or not all(isinstance(p, Tensor) and p.dim() == 2 for p in log_psi):
            raise TypeError("log_psi must be a list of [P, V^t] tensors, t = 0..L (soft_values' output)")
        self.log_psi, self.prompt_ids = list(log_psi), checks.tensor("prompt_ids", prompt_ids, dims=2, integral=True)

    def start(self, prompt_ids: Tensor) -> Tensor:
        hit = (prompt_ids[:, None, :] == self.prompt_ids[None].to(prompt_ids.device)).all(-1)  # [N, P]
        if not bool(hit.any(1).all()):
            raise ValueError("a prompt is not among the twist's prompt_ids")
        return torch.nn.functional.pad(hit.float().argmax(1)[:, None], (0, 2))  # (row, t = 0, code = 0)

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:
        return torch.stack([state[:, 0], state[:, 1] + 1, state[:, 2] * self.log_psi[1].shape[1] + tokens], 1)

    def __call__(self, state: Tensor, logits: Tensor) -> StepLogits:
        (p, t, code), V = state.unbind(1), logits.shape[-1]
        now, nxt = (x.to(logits.device, torch.float32) for x in self.log_psi[int(t[0]):int(t[0]) + 2])
        nxt = nxt[p[:, None], code[:, None] * V + torch.arange(V, device=logits.device)]  # [N, V]
        log_p = torch.log_softmax(logits.float(), -1)
        return StepLogits(torch.log_softmax(log_p + nxt, -1), log_p + nxt - now[p, code][:, None])
