r"""Sample pools: k completions per prompt from a model, their rewards and their features.

A :class:`Pool` is what a Q-probe trains and is evaluated on, and what best-of-n and the other
inference-time selectors of the book choose from: the samples (:class:`refimpl.lm.Samples`),
one reward per sample and the feature phi(x, y) of each sample at one layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import checks, lm, sampling

__all__ = ["Pool", "collect", "embed_texts"]


@dataclass
class Pool:
    """k samples of each of P prompts with their rewards and features, all on one device."""

    samples: lm.Samples  # P·k rows, prompt-major
    rewards: Tensor  # [P, k] float32
    features: Tensor  # [P, k, d] float32 (phi at the layer and position it was collected at)

    def __post_init__(self):
        """Shapes and devices first, then finiteness: rewards [P, k] and features [P, k, d] of the samples' P·k rows."""
        checks.instance("samples", self.samples, lm.Samples)
        checks.same_device(samples=self.samples.device, rewards=self.rewards, features=self.features)
        checks.tensor("rewards", self.rewards, dims=2, floating=True)
        checks.tensor("features", self.features, dims=3, floating=True)
        groups = (self.samples.n_prompts, self.samples.k)
        for name, t in (("rewards", self.rewards), ("features", self.features)):
            if tuple(t.shape[:2]) != groups:
                raise ValueError(f"{name} must have shape [P, k, ...] = {groups} (the samples' prompts and k), "
                                 f"got {tuple(t.shape)}")
        checks.finite("rewards", self.rewards), checks.finite("features", self.features)

    @property
    def texts(self) -> list[str]:
        """The P·k completion texts, prompt-major."""
        return self.samples.texts

    def prompts(self, which: Tensor | Sequence[int]) -> "Pool":
        """The pool restricted to the prompts ``which`` (positions 0..P-1), in that order."""
        which = sampling._indices("which", which, self.rewards.shape[0], self.rewards.device)
        return Pool(self.samples.prompts(which), self.rewards[which], self.features[which])


def collect(model, tokenizer, prompts: Sequence[str], targets: Sequence, reward_fn: Callable, k: int,
            max_new_tokens: int = 8, temperature: float = 1.0, layer: int = -1, before_last: bool = False,
            seed: int = 0, batch_size: int = 1024) -> Pool:
    r"""Sample k completions per prompt, score them, and embed all P·k of them.

    1. ``lm.sample``: k completions per prompt (batched ``generate``).
    2. ``reward_fn(texts, targets)``: one reward per completion (targets repeated per sample).
    3. ``lm.embed``: phi at ``layer`` of the last completion token (or the one before it,
       ``before_last``), in batched forwards over already-generated tokens (one parallel pass
       instead of a decoding loop: cheap where decoding is memory-bound, as on a GPU; about as
       costly as generating on a CPU, where both are compute-bound -- see ``bench/bench_qprobe.py``).

    Returns:
        :class:`Pool` with rewards [P, k] and features [P, k, d], on the model's device (the
        rewards ``reward_fn`` returns are moved there).
    """
    prompts = checks.strings("prompts", prompts)
    if isinstance(targets, (str, bytes)) or not isinstance(targets, (Sequence, Tensor)):
        raise TypeError(f"targets must be a sequence with one target per prompt, got {type(targets).__name__}")
    if len(prompts) != len(targets):
        raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as reward_fn(texts, targets), got {type(reward_fn).__name__}")
    s = lm.sample(model, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed)  # lm.sample's own batching: the same seed gives the same samples
    device = s.completion_ids.device
    rewards = checks.rewards(reward_fn(s.texts, s.expand(list(targets))), len(s))
    features = lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                        layer=layer, before_last=before_last, batch_size=batch_size)  # [P*k, d]
    return Pool(s, s.by_prompt(rewards.to(device).float()), s.by_prompt(features))


def embed_texts(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], layer: int = -1,
                before_last: bool = False, batch_size: int = 1024) -> Tensor:
    """phi(x, y) for text pairs, tokenized by ``tokenizer`` (of a model other than the sampler's).

    The completion is tokenized without special tokens and appended to the prompt; the
    tokenizer's padding side is left as the caller set it.

    Returns:
        [B, d] float32 features.
    """
    prompts = checks.strings("prompts", prompts)
    completions = checks.strings("completions", completions)
    if len(prompts) != len(completions):
        raise ValueError(f"prompts has {len(prompts)} entries but completions has {len(completions)}")
    if any(not c.strip() for c in completions):
        raise ValueError("completions must not be empty (there would be no completion token to read)")
    device = next(model.parameters()).device
    with lm.padding_side(tokenizer, "left"):
        x = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    with lm.padding_side(tokenizer, "right"):
        y = tokenizer(list(completions), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    return lm.embed(model, x["input_ids"], x["attention_mask"], y["input_ids"], y["attention_mask"],
                    layer=layer, before_last=before_last, batch_size=batch_size)
