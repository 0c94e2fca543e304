r"""What every chapter needs from a Hugging Face causal LM, for any architecture.

* :func:`sequence_logprobs` -- log pi(y|x) of completions, summed and per token.
* :func:`sample` -- k completions per prompt (KV cache, temperature / top-k / top-p, logits
  processors, seeded) with their token ids, masks and texts.
* :func:`embed` -- the hidden state phi(x, y) of the last completion token at a chosen layer.

Conventions (those of ``model.generate``): prompts are left-padded ``[B, P]`` with an attention
mask; completions are right-padded ``[B, T]`` with a mask that is 1 on real tokens, the stop
token included (stopping is part of the sequence's probability). Right-padded prompts are
accepted and re-aligned to the left first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Samples", "left_align", "forward", "sequence_logprobs", "sample", "embed", "completion_mask"]


@dataclass
class Samples:
    """k completions for each of B prompts, flattened prompt-major to B·k rows."""

    prompt_ids: Tensor  # [B*k, P] left-padded
    prompt_mask: Tensor  # [B*k, P] 1 on real prompt tokens
    completion_ids: Tensor  # [B*k, T] right-padded with pad_token_id
    completion_mask: Tensor  # [B*k, T] 1 on real completion tokens (stop token included)
    texts: list[str]  # B*k decoded completions (stop token and padding removed)
    prompt_index: Tensor  # [B*k] index of the prompt each row answers
    k: int  # completions per prompt

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def _check_pair(ids: Tensor, mask: Tensor, name: str) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"{name}_ids must be a 2-D tensor [batch, length]")
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ValueError(f"{name}_mask must be a tensor of shape {tuple(ids.shape)}")


def left_align(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens (mask == 1) to the right end, keeping their order.

    Left-padded input comes back unchanged; right-padded input becomes left-padded.
    """
    _check_pair(ids, mask, "prompt")
    order = torch.argsort(mask.long(), dim=1, stable=True)  # [B, P]: pads first, then tokens
    return ids.gather(1, order), mask.gather(1, order)


def completion_mask(completion_ids: Tensor, eos_token_id: int | Sequence[int] | None) -> Tensor:
    """1 on tokens up to and including the first stop token of each row, 0 after it.

    Args:
        completion_ids: [B, T] generated tokens.
        eos_token_id: stop token id(s), or ``None`` (every token is real).

    Returns:
        [B, T] long mask.
    """
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos).long()  # [B, T]
    # Tokens strictly after the first stop have a stop somewhere before them.
    before = torch.cumsum(is_eos, dim=1) - is_eos  # stops strictly before t
    return (before == 0).long()


def forward(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, **kw):
    """One forward pass on [prompt | completion] with positions that skip the padding.

    Prompts are left-aligned first, so the logits at position ``P - 1 + t`` (P = prompt width)
    predict completion token t. Extra keyword arguments go to the model.

    Returns:
        The model's output (``.logits`` of shape [B, P + T, V]).
    """
    _check_pair(prompt_ids, prompt_mask, "prompt")
    _check_pair(completion_ids, completion_mask, "completion")
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"prompt_ids has {prompt_ids.shape[0]} rows but completion_ids has {completion_ids.shape[0]}"
        )
    prompt_ids, prompt_mask = left_align(prompt_ids, prompt_mask)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attn = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    return model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False, **kw)


def sequence_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""log pi(y|x) = sum_t log pi(y_t | x, y_<t) over real completion tokens.

    Args:
        model: a causal LM (``AutoModelForCausalLM``).
        prompt_ids, prompt_mask: [B, P] prompts (left- or right-padded).
        completion_ids, completion_mask: [B, T] right-padded completions.
        temperature: logits are divided by it first (as when sampling), > 0.

    Returns:
        ``(summed [B], per_token [B, T])``; per_token is 0 where ``completion_mask`` is 0.
        Gradients flow into the model's parameters.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    P = prompt_ids.shape[1]
    logits = forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits
    # The token at position P+t is predicted by the logits at P+t-1.
    logits = logits[:, P - 1 : -1, :].float() / temperature  # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1)
    per_token = logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    per_token = per_token * completion_mask.to(per_token.dtype)
    return per_token.sum(-1), per_token


@torch.no_grad()
def embed(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    layer: int = -1,
    batch_size: int = 1024,
) -> Tensor:
    r"""phi(x, y): the hidden state of the last real completion token at ``layer``.

    ``layer`` indexes ``output_hidden_states``: 0 is the embedding output, i the output of block
    i, -1 the last entry (after the final norm in GPT-2, Llama and Qwen2). A row with an empty
    completion uses the last prompt token.

    Returns:
        [B, d] float32 features on the model's device.
    """
    _check_pair(completion_ids, completion_mask, "completion")
    P = prompt_ids.shape[1]
    out = []
    for s in range(0, completion_ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        hs = forward(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl],
                      output_hidden_states=True).hidden_states
        n_layers = len(hs)
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be in [{-n_layers}, {n_layers - 1}], got {layer}")
        h = hs[layer]  # [b, P+T, d]
        last = P - 1 + completion_mask[sl].long().sum(1)  # [b] index of the last real token
        out.append(h[torch.arange(h.shape[0], device=h.device), last].float())
    return torch.cat(out)


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
) -> Samples:
    r"""Draw k completions for each prompt with ``model.generate`` (KV cache on).

    ``temperature=0`` means greedy decoding. Sampling is seeded: the same ``seed`` gives the same
    completions on the same device, and the global RNG state is restored afterwards.

    Args:
        prompts: B prompt texts.
        k: completions per prompt.
        logits_processor: a ``LogitsProcessorList`` (or list) passed to ``generate``; it runs
            before temperature, top-k and top-p.
        batch_size: rows (prompt copies) per ``generate`` call.

    Returns:
        :class:`Samples` with B·k rows, prompt-major (rows i·k … i·k+k-1 answer prompt i).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")

    device = next(model.parameters()).device
    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        temperature=None if greedy else temperature, top_k=None if greedy else (top_k or 0),
        top_p=None if greedy else (top_p if top_p is not None else 1.0),
        bos_token_id=gen.bos_token_id,
    )
    processors = LogitsProcessorList(list(logits_processor or []))

    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    ids = enc["input_ids"].repeat_interleave(k, dim=0)  # [B*k, P]
    mask = enc["attention_mask"].repeat_interleave(k, dim=0)

    chunks = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, ids.shape[0], batch_size):
            out = model.generate(input_ids=ids[s : s + batch_size], attention_mask=mask[s : s + batch_size],
                                 generation_config=config, logits_processor=processors)
            chunks.append(out[:, ids.shape[1] :])
    T = max(c.shape[1] for c in chunks)
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, T - c.shape[1]), value=pad) for c in chunks])
    cmask = completion_mask(completion_ids, eos)
    stops = set(torch.as_tensor(eos).reshape(-1).tolist()) if eos is not None else set()
    texts = tokenizer.batch_decode(
        [[t for t, m in zip(row, mrow) if m and t not in stops] for row, mrow in
         zip(completion_ids.tolist(), cmask.tolist())],
        skip_special_tokens=True,
    )
    index = torch.arange(len(prompts), device=device).repeat_interleave(k)
    return Samples(ids, mask, completion_ids, cmask, texts, index, k)
