r"""What every chapter needs from a Hugging Face causal LM, for any architecture.

* :func:`sequence_logprobs` -- log pi(y|x) of completions, summed and per token.
* :func:`sample` -- k completions per prompt (KV cache, temperature / top-k / top-p, logits
  processors, seeded) with their token ids, masks and texts, as :class:`Samples` (both live in
  :mod:`refimpl.sampling` and are re-exported here); with ``features_layer=L`` also phi(x, y) as
  ``embed(..., layer=L, before_last=True)`` gives it, read while decoding (no second pass).
* :func:`embed` -- the hidden state phi(x, y) of the last completion token at a chosen layer.

Conventions (those of ``model.generate``): prompts are left-padded ``[B, P]`` with an attention
mask; completions are right-padded ``[B, T]`` with a mask that is 1 on real tokens, the stop
token included (stopping is part of the sequence's probability). Right-padded prompts are
accepted and re-aligned to the left first. Every public function checks its input on entry
(tensors on the model's device, shapes, 0/1 masks, padding sides, token ids inside the vocabulary,
the context length); the trainers call the unchecked cores (``_forward``) inside their loops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from ._hidden import final_norm, n_layers
from .sampling import Samples, _context_length, completion_mask, padding_side, sample  # noqa: F401 (re-exported)

__all__ = ["Samples", "left_align", "forward", "sequence_logprobs", "sample", "embed", "embed_layers", "completion_mask",
           "completion_logits", "last_token_index", "padding_side"]


# --- validation --------------------------------------------------------------------------------

def _check_pair(ids: Tensor, mask: Tensor, name: str) -> None:
    checks.tensor(f"{name}_ids", ids, dims=2, integral=True)
    checks.tensor(f"{name}_mask", mask, integral=True)
    if mask.shape != ids.shape:
        raise ValueError(f"{name}_mask must have the shape of {name}_ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name}_mask must hold only 0 and 1")


def _device(model) -> torch.device | None:
    """Where the model reads its input: the device of its input embedding (else of its first parameter)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a causal LM (a torch.nn.Module), got {type(model).__name__}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next((p.device for p in model.parameters()), None)


def _vocab_size(model) -> int:
    emb = model.get_input_embeddings()
    return emb.weight.shape[0] if emb is not None else model.config.vocab_size


def _check_inputs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                  completion_mask: Tensor) -> None:
    """Tensors on the model's device (checked first: no value is read before), shapes, 0/1 masks, a
    real prompt token in every row, right-padded completions, ids inside the vocabulary and
    sequences that fit the model's context."""
    checks.same_device(model=_device(model), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=completion_ids, completion_mask=completion_mask)
    _check_pair(prompt_ids, prompt_mask, "prompt")
    _check_pair(completion_ids, completion_mask, "completion")
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows but completion_ids has {completion_ids.shape[0]}")
    if prompt_ids.shape[0] == 0:
        raise ValueError("prompt_ids must hold at least one row (a batch of zero sequences)")
    if bool((prompt_mask.sum(1) == 0).any()):
        raise ValueError("prompt_mask has a row with no real token: the first completion token would be "
                         "predicted from padding")
    if completion_mask.shape[1] > 1 and bool((completion_mask[:, 1:] > completion_mask[:, :-1]).any()):
        raise ValueError("completion_mask must be right-padded (ones, then zeros) in every row")
    V = _vocab_size(model)
    for name, ids in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"{name} must be token ids in [0, {V}), got values in [{int(ids.min())}, {int(ids.max())}]")
    n_ctx = _context_length(model)
    longest = int((prompt_mask.sum(1) + completion_mask.sum(1)).max()) if len(prompt_ids) else 0
    if n_ctx is not None and longest > n_ctx:
        raise ValueError(f"prompt + completion is {longest} tokens long but the model's context is {n_ctx}")


# --- layout helpers ------------------------------------------------------------------------------

def left_align(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens (mask == 1) to the right end, keeping their order.

    Left-padded input comes back unchanged; right-padded input becomes left-padded.
    """
    checks.same_device(ids=ids, mask=mask)
    _check_pair(ids, mask, "prompt")
    order = torch.argsort(mask.long(), dim=1, stable=True)  # [B, P]: pads first, then tokens
    return ids.gather(1, order), mask.gather(1, order)


def completion_logits(logits: Tensor, prompt_width: int) -> Tensor:
    """[B, P + T, V] logits of [prompt | completion] -> [B, T, V], row t predicting completion token t
    (the token at position P + t is predicted by the logits at P + t - 1); 1 <= P <= P + T."""
    checks.tensor("logits", logits, dims=3)
    prompt_width = checks.integer("prompt_width", prompt_width, low=1, high=logits.shape[1])
    return logits[:, prompt_width - 1 : -1, :]


def last_token_index(prompt_width: int, completion_mask: Tensor, before_last: bool = False) -> Tensor:
    """[B] position in [prompt | completion] of each row's last real completion token (or of the
    token before it, ``before_last``); a row with an empty completion gives the last prompt token.
    ``completion_mask`` [B, T]: right-padded, 0/1."""
    prompt_width = checks.integer("prompt_width", prompt_width, low=1)
    checks.tensor("completion_mask", completion_mask, dims=2, integral=True)
    if bool(((completion_mask != 0) & (completion_mask != 1)).any()) or (
            completion_mask.shape[1] > 1 and bool((completion_mask[:, 1:] > completion_mask[:, :-1]).any())):
        raise ValueError("completion_mask must hold only 0 and 1, right-padded (ones, then zeros) in every row")
    return _last_token_index(prompt_width, completion_mask, checks.boolean("before_last", before_last))


def _last_token_index(prompt_width: int, completion_mask: Tensor, before_last: bool = False) -> Tensor:
    """:func:`last_token_index` without checks."""
    n = completion_mask.long().sum(1)  # [B] real completion tokens
    if before_last:
        n = (n - 1).clamp(min=0)
    return prompt_width - 1 + n


# --- forward passes ------------------------------------------------------------------------------

def _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kw):
    """:func:`forward` without input checks (for loops over inputs already checked or generated)."""
    order = torch.argsort(prompt_mask.long(), dim=1, stable=True)  # left-align the prompts
    prompt_ids, prompt_mask = prompt_ids.gather(1, order), prompt_mask.gather(1, order)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attn = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
    return model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False, **kw)


def forward(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, **kw):
    """One forward pass on [prompt | completion] with positions that skip the padding.

    Prompts are left-aligned first, so ``completion_logits(out.logits, P)`` row t predicts
    completion token t (P = prompt width). Extra keyword arguments go to the model.

    Returns:
        The model's output (``.logits`` of shape [B, P + T, V]).
    """
    _check_inputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kw)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs, also under PEFT)."""
    import inspect

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _one_logit(model) -> dict:
    """Keyword arguments that spare the output layer when only hidden states are wanted: its logits on
    one position instead of all P + T (at a 50k vocabulary most of a small model's pass)."""
    return {"logits_to_keep": 1} if _keeps_logits(model) else {}


def _sequence_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """:func:`sequence_logprobs` without input checks."""
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    if _keeps_logits(model):  # the output layer runs on the T predicting positions only: at a large
        # vocabulary most of the pass's FLOPs, and its largest tensor (no [B, P+T, V] logits, no slice of them)
        keep = torch.arange(P - 1, P + T - 1, device=completion_ids.device)
        logits = _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, logits_to_keep=keep).logits
    else:
        logits = _forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits[:, P - 1 : -1, :]
    logits = logits.float()  # [B, T, V]: row t predicts completion token t
    if temperature != 1.0:  # the maximum shifted to 0 first: logits / 1e-40 would overflow (inf - inf = NaN)
        logits = (logits - logits.amax(-1, keepdim=True).detach()) / temperature
    logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    per_token = logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    pad = completion_mask == 0
    per_token = per_token.masked_fill(pad & torch.isneginf(per_token), 0.0)  # -inf · 0 would be NaN on padding
    per_token = per_token * completion_mask.to(per_token.dtype)
    return per_token.sum(-1), per_token


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
        prompt_ids, prompt_mask: [B, P] prompts (left- or right-padded; one real token at least).
        completion_ids, completion_mask: [B, T] right-padded completions.
        temperature: logits are divided by it first (as when sampling), > 0.

    Returns:
        ``(summed [B], per_token [B, T])`` in float32; per_token is 0 where ``completion_mask`` is 0,
        ``-inf`` for a token of probability 0 (underflow at a tiny temperature).
        Gradients flow into the model's parameters.
    """
    temperature = checks.real("temperature", temperature, low=0.0, low_open=True)
    _check_inputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return _sequence_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature)


@torch.no_grad()
def embed(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    layer: int = -1,
    before_last: bool = False,
    batch_size: int = 1024,
) -> Tensor:
    r"""phi(x, y): the hidden state of the last real completion token at ``layer``.

    ``layer`` indexes ``output_hidden_states``: 0 is the embedding output, i the output of block
    i, -1 the last entry (after the final norm in GPT-2, Llama and Qwen2). ``before_last=True``
    reads the token before the last one instead: with completions that end in a stop token, the
    last token of the answer itself (the Q-Probe paper's position). A row with an empty
    completion uses the last prompt token.

    Returns:
        [B, d] float32 features on the model's device.
    """
    _check_inputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    before_last = checks.boolean("before_last", before_last)
    L = n_layers(model)
    layer = checks.integer("layer", layer, low=-(L + 1), high=L)
    P = prompt_ids.shape[1]
    out = []
    for s in range(0, completion_ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        h = _forward(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl],
                     output_hidden_states=True, **_one_logit(model)).hidden_states[layer]  # [b, P+T, d]
        last = _last_token_index(P, completion_mask[sl], before_last)  # [b]
        out.append(h[torch.arange(h.shape[0], device=h.device), last].float())
    return torch.cat(out)


@torch.no_grad()
def embed_layers(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                 before_last: bool | None = False, batch_size: int = 1024) -> Tensor:
    r"""phi(x, y) at every depth in one pass: [B, n_layers + 2, d].

    Index 0 is the embedding output, i = 1..n_layers the residual stream after block i *before*
    the final norm (the paper's kind of feature), and n_layers + 1 the last block after the final
    norm (what :func:`embed` returns with ``layer=-1``). Position as in :func:`embed`;
    ``before_last=None`` reads both positions from the same pass: [B, 2, n_layers + 2, d]
    (index 0 the last completion token, 1 the token before it).
    """
    _check_inputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    before_last = None if before_last is None else checks.boolean("before_last", before_last)
    norm = final_norm(model)
    if norm is None:
        raise ValueError(f"{type(model).__name__}: no final norm (ln_f / norm) found to read the stream before it")
    P, out, seen = prompt_ids.shape[1], [], []
    hook = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        for s in range(0, completion_ids.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            seen.clear()
            hs = _forward(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl],
                          output_hidden_states=True, **_one_logit(model)).hidden_states  # n_layers + 1, last after the norm
            h = torch.stack([*hs[:-1], seen[-1], hs[-1]], 1)  # [b, n_layers + 2, P+T, d]
            rows = torch.arange(h.shape[0], device=h.device)
            picks = [h[rows, :, _last_token_index(P, completion_mask[sl], b)].float()  # [b, n_layers + 2, d]
                     for b in ((False, True) if before_last is None else (bool(before_last),))]
            out.append(torch.stack(picks, 1) if before_last is None else picks[0])
    finally:
        hook.remove()
    return torch.cat(out)
