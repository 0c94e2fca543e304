r"""Sampling k completions per prompt from any causal LM, and the layout that carries them.

:func:`sample` wraps ``model.generate`` (KV cache, temperature / top-k / top-p, logits processors,
seeded) and returns :class:`Samples`: B·k rows, prompt-major, with prompts left-padded and
completions right-padded, each with a 0/1 mask (the stop token counts as a real completion token),
and on request the Q-probe features phi(x, y) read during decoding (no second forward pass).
:mod:`refimpl.lm` re-exports these names (``lm.sample``, ``lm.Samples``) next to the forward passes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from numbers import Integral
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from . import checks
from ._hidden import DecodeFeatures, n_layers

__all__ = ["Samples", "sample", "completion_mask", "padding_side", "TINY_TEMPERATURE"]

TINY_TEMPERATURE = 1e-3  # below it, logits are shifted to a maximum of 0 before the division by T


@dataclass
class Samples:
    """k completions for each of B prompts, flattened prompt-major to B·k rows (rows i·k … i·k+k-1
    answer prompt i)."""

    prompt_ids: Tensor  # [B*k, P] left-padded
    prompt_mask: Tensor  # [B*k, P] 1 on real prompt tokens
    completion_ids: Tensor  # [B*k, T] right-padded with pad_token_id
    completion_mask: Tensor  # [B*k, T] 1 on real completion tokens (stop token included)
    texts: list[str]  # B*k decoded completions (stop token and padding removed)
    prompt_index: Tensor  # [B*k] index of the prompt each row answers
    k: int  # completions per prompt
    features: Tensor | None = None  # [B*k, d] float32 phi(x, y) read while sampling (sample(features_layer=...))

    def __post_init__(self):
        """Shapes, kinds and devices only (no value is read): B·k rows everywhere, k dividing them."""
        checks.same_device(completion_ids=self.completion_ids, completion_mask=self.completion_mask,
                           prompt_ids=self.prompt_ids, prompt_mask=self.prompt_mask, prompt_index=self.prompt_index,
                           features=self.features)
        if self.features is not None:
            checks.tensor("features", self.features, dims=2, floating=True)
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            checks.tensor(name, getattr(self, name), dims=2, integral=True)
        checks.same_shape(prompt_ids=self.prompt_ids, prompt_mask=self.prompt_mask)
        checks.same_shape(completion_ids=self.completion_ids, completion_mask=self.completion_mask)
        rows = self.completion_ids.shape[0]
        checks.tensor("prompt_index", self.prompt_index, dims=1, integral=True)
        texts = checks.strings("texts", self.texts, allow_empty=True)
        for name, n in (("prompt_ids", self.prompt_ids.shape[0]), ("prompt_index", len(self.prompt_index)),
                        ("texts", len(texts)), ("features", rows if self.features is None else len(self.features))):
            if n != rows:
                raise ValueError(f"{name} has {n} rows but completion_ids has {rows}")
        if checks.integer("k", self.k, low=1) and rows % self.k:
            raise ValueError(f"k={self.k} completions per prompt must divide the {rows} rows")

    @property
    def device(self) -> torch.device:
        """The device every tensor of the samples lives on."""
        return self.completion_ids.device

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def n_prompts(self) -> int:
        """B, the number of prompts."""
        return len(self) // self.k

    def rows(self, index: Tensor | Sequence[int], k: int | None = None) -> "Samples":
        """The samples at ``index`` (row indices, or a boolean mask over the rows), with ``k``
        completions per prompt in the result (default: ``len(index)`` if it is not a multiple of
        ``self.k``, else ``self.k``)."""
        index = _indices("index", index, len(self), self.device)
        k = k if k is not None else (self.k if len(index) % self.k == 0 else len(index))
        k = checks.integer("k", k, low=1)
        if len(index) % k:
            raise ValueError(f"k={k} does not divide the {len(index)} selected rows")
        return replace(self, prompt_ids=self.prompt_ids[index], prompt_mask=self.prompt_mask[index],
                       completion_ids=self.completion_ids[index], completion_mask=self.completion_mask[index],
                       texts=[self.texts[i] for i in index.tolist()], prompt_index=self.prompt_index[index], k=k,
                       features=None if self.features is None else self.features[index])

    def prompts(self, which: Tensor | Sequence[int]) -> "Samples":
        """All k samples of the prompts ``which`` (positions 0..B-1, or a boolean mask over them), in that order."""
        which = _indices("which", which, self.n_prompts, self.device)
        rows = (which[:, None] * self.k + torch.arange(self.k, device=which.device)).reshape(-1)  # [m*k]
        return self.rows(rows, k=self.k)

    def by_prompt(self, values: Tensor) -> Tensor:
        """A per-row tensor [B·k, ...] viewed per prompt: [B, k, ...]."""
        if checks.tensor("values", values, min_dims=1).shape[0] != len(self):
            raise ValueError(f"values has {values.shape[0]} rows but the samples have {len(self)}")
        return values.reshape(self.n_prompts, self.k, *values.shape[1:])

    def expand(self, per_prompt: Sequence | Tensor) -> list | Tensor:
        """Per-prompt values (length B) repeated for each of the prompt's k rows (length B·k).

        A tensor gives a tensor; any other sequence (targets, say) gives a list.
        """
        if isinstance(per_prompt, (str, bytes)) or not isinstance(per_prompt, (Sequence, Tensor)) or (
                isinstance(per_prompt, Tensor) and per_prompt.dim() == 0):
            raise TypeError(f"per_prompt must be a sequence or a tensor of B values, got {type(per_prompt).__name__}")
        if len(per_prompt) != self.n_prompts:
            raise ValueError(f"per_prompt has {len(per_prompt)} entries but the samples have "
                             f"{self.n_prompts} prompts")
        if isinstance(per_prompt, Tensor):
            return per_prompt.repeat_interleave(self.k, dim=0)
        return [v for v in per_prompt for _ in range(self.k)]

    def contains(self, token_ids: Sequence[int] | Tensor) -> Tensor:
        """[B·k] bool: whether a row's real completion tokens include any of ``token_ids``."""
        ids = torch.tensor(checks.token_ids("token_ids", token_ids), dtype=torch.long,
                           device=self.completion_ids.device)
        return (torch.isin(self.completion_ids, ids) & self.completion_mask.bool()).any(-1)


def _indices(name: str, index, size: int, device: torch.device) -> Tensor:
    """Row indices in [0, size) as a long tensor on ``device``, from ints (a list, a tensor) or a
    boolean mask of length ``size``; floats are refused (they would be truncated)."""
    if isinstance(index, (str, bytes)):
        raise TypeError(f"{name} must be integer indices or a boolean mask, got {type(index).__name__}")
    if not isinstance(index, Tensor):
        try:
            index = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be integer indices or a boolean mask, got {type(index).__name__}") from e
        index = index if index.numel() else index.long()  # [] would be float
    if index.dtype == torch.bool:
        if index.dim() != 1 or len(index) != size:
            raise ValueError(f"{name}: a boolean mask must have one entry per item ({size}), got shape {tuple(index.shape)}")
        index = index.nonzero().squeeze(1)
    elif index.is_floating_point() or index.is_complex():
        raise TypeError(f"{name} must hold integer indices or be a boolean mask, got {index.dtype}")
    index = index.to(device=device, dtype=torch.long).reshape(-1)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"{name} must lie in [0, {size}), got values in [{int(index.min())}, {int(index.max())}]")
    return index


def completion_mask(completion_ids: Tensor, eos_token_id: int | Sequence[int] | None) -> Tensor:
    """1 on tokens up to and including the first stop token of each row, 0 after it.

    Args:
        completion_ids: [B, T] generated tokens.
        eos_token_id: stop token id(s), or ``None`` (every token is real).

    Returns:
        [B, T] long mask.
    """
    checks.tensor("completion_ids", completion_ids, dims=2, integral=True)
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    eos = torch.tensor(checks.token_ids("eos_token_id", [eos_token_id] if isinstance(eos_token_id, Integral)
                                        else eos_token_id), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).long()  # [B, T]
    before = torch.cumsum(is_eos, dim=1) - is_eos  # stops strictly before t
    return (before == 0).long()


@contextlib.contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    """Set ``tokenizer.padding_side`` for the block and restore the caller's setting afterwards."""
    side = checks.choice("side", side, ("left", "right"))
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


def _context_length(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def _generation_config(model, tokenizer, max_new_tokens, temperature, top_k, top_p):
    """A GenerationConfig that states every sampling setting, and a blank one to stand in for the
    model's own while generating (so a hub model's repetition_penalty, min_p, ... never apply)."""
    from transformers import GenerationConfig

    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=max_new_tokens, eos_token_id=gen.eos_token_id, pad_token_id=pad,
        bos_token_id=gen.bos_token_id, temperature=None if greedy else temperature,
        top_k=None if greedy else (top_k or 0), top_p=None if greedy else (top_p if top_p is not None else 1.0),
        num_beams=1,
    )
    return config, GenerationConfig(eos_token_id=gen.eos_token_id, pad_token_id=pad, bos_token_id=gen.bos_token_id)


@contextlib.contextmanager
def _own_generation_config(model, blank) -> Iterator[None]:
    old = model.generation_config
    model.generation_config = blank
    try:
        yield
    finally:
        model.generation_config = old


def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    k: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    logits_processor=None,
    seed: int | None = 0,
    batch_size: int = 512,
    features_layer: int | None = None,
) -> Samples:
    r"""Draw k completions for each prompt with ``model.generate`` (KV cache on).

    ``temperature=0`` means greedy decoding. Only the settings passed here apply: fields that the
    model's own ``generation_config`` sets (``repetition_penalty``, ``min_p``,
    ``no_repeat_ngram_size``, ``suppress_tokens``, ...) are neutralized, so the sampled law is
    softmax(logits / T) after the given processors and truncation. Sampling is seeded: the same
    ``seed`` gives the same completions on the same device, and the global RNG state is restored
    afterwards. The tokenizer's ``padding_side`` is left as the caller set it.

    Args:
        prompts: B prompt texts.
        k: completions per prompt.
        logits_processor: a ``LogitsProcessorList`` (or list) passed to ``generate``; it runs
            before temperature, top-k and top-p.
        batch_size: rows (prompt copies) per ``generate`` call.
        features_layer: if given, ``features`` is phi(x, y) [B·k, d] float32, the Q-probe feature: the
            hidden state at that layer (0 the embeddings, i after block i, -1 after the final norm,
            as in :func:`refimpl.lm.embed`) of the token before the last real one (the answer's last
            token when the row stopped), read by hooks while decoding; equal up to float rounding to
            ``lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
            layer=features_layer, before_last=True)``, without that second forward pass.

    Returns:
        :class:`Samples` with B·k rows, prompt-major (rows i·k … i·k+k-1 answer prompt i).
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must be a causal LM (a torch.nn.Module with .generate), got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "padding_side"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    processors = list(logits_processor) if isinstance(logits_processor, Iterable) else []
    if logits_processor is not None and not (isinstance(logits_processor, Iterable) and all(map(callable, processors))):
        raise TypeError(f"logits_processor must be a list of logits processors, got {type(logits_processor).__name__}")
    prompts = checks.strings("prompts", prompts)
    k = checks.integer("k", k, low=1)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    temperature = checks.real("temperature", temperature, low=0.0)
    if top_p is not None:
        top_p = checks.real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if top_k is not None:
        top_k = checks.integer("top_k", top_k, low=1)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    if features_layer is not None:
        L = n_layers(model)
        features_layer = checks.integer("features_layer", features_layer, low=-(L + 1), high=L)
    if seed is not None:
        seed = checks.integer("seed", seed, low=-(2**63), high=2**64 - 1)  # what torch.manual_seed takes

    device = next(model.parameters()).device
    config, blank = _generation_config(model, tokenizer, max_new_tokens, temperature, top_k, top_p)
    eos, pad = config.eos_token_id, config.pad_token_id
    processors = LogitsProcessorList(processors)
    if 0 < temperature < TINY_TEMPERATURE:  # logits / T would overflow (inf - inf = NaN): shift the maximum to 0 first

        class ShiftMax(LogitsProcessor):
            def __call__(self, input_ids, scores):
                return scores - scores.amax(-1, keepdim=True)

        processors.append(ShiftMax())
    with padding_side(tokenizer, "left"):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    if bool((enc["attention_mask"].sum(1) == 0).any()):
        raise ValueError("prompts must not tokenize to nothing")
    n_ctx = _context_length(model)
    if n_ctx is not None and enc["input_ids"].shape[1] + max_new_tokens > n_ctx:
        raise ValueError(f"the longest prompt ({enc['input_ids'].shape[1]} tokens) plus max_new_tokens="
                         f"{max_new_tokens} exceeds the model's context of {n_ctx}")
    ids = enc["input_ids"].repeat_interleave(k, dim=0)  # [B*k, P]
    mask = enc["attention_mask"].repeat_interleave(k, dim=0)

    stop = torch.as_tensor([] if eos is None else eos, dtype=torch.long, device=device).reshape(-1)
    chunks, feats = [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _own_generation_config(model, blank):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, ids.shape[0], batch_size):
            # with features_layer: a hook and a processor of its own per generate call (removed on exit)
            with contextlib.nullcontext() if features_layer is None else DecodeFeatures(model, features_layer, stop) as cap:
                out = model.generate(input_ids=ids[s : s + batch_size], attention_mask=mask[s : s + batch_size],
                                     generation_config=config,
                                     logits_processor=processors if cap is None else LogitsProcessorList([*processors, cap]))
            chunks.append(out[:, ids.shape[1] :])
            feats.append(cap and cap.feat)
    T = max(c.shape[1] for c in chunks)
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, T - c.shape[1]), value=pad) for c in chunks])
    cmask = completion_mask(completion_ids, eos)
    stops = set(stop.tolist())
    texts = tokenizer.batch_decode(
        [[t for t, m in zip(row, mrow) if m and t not in stops] for row, mrow in
         zip(completion_ids.tolist(), cmask.tolist())],
        skip_special_tokens=True,
    )
    index = torch.arange(len(prompts), device=device).repeat_interleave(k)
    features = None if features_layer is None else torch.cat(feats)  # [B*k, d]
    return Samples(ids, mask, completion_ids, cmask, texts, index, k, features)
