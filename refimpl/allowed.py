r"""The allowed mass w(y) = prod_t Z_t of a completion under a banned set, by forward passes.

Z_t is the mass that the unconstrained next-token law softmax(logits / T) puts outside the banned
set B(x, y_<t) (Lee 2025, arXiv 2503.18050): (G)I-DLE's token-wise renormalization samples
q(y) = P_T(y) / w(y), and w is the importance weight that corrects it
(:func:`refimpl.idle.corrected_sample`, :mod:`refimpl.smc`). :mod:`refimpl.idle` re-exports
:func:`log_allowed_mass`; ``IDLELogitsProcessor(track_temperature=T)`` records the same numbers
during generation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks, constraints, lm
from .sampling import TINY_TEMPERATURE

__all__ = ["log_allowed_mass"]


def _rows_per_batch(width: int, vocab_size: int, max_elements: int) -> int:
    """Rows per pass for [rows, width, V] float32 logits within ``max_elements`` (at least one row)."""
    return max(1, max_elements // max(1, width * vocab_size))


@torch.no_grad()
def log_allowed_mass(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                     completion_mask: Tensor, banned_ids, temperature: float = 1.0, batch_size: int | None = None,
                     max_elements: int = 2**26) -> Tensor:
    r"""log w(y) = sum_t log Z_t over real completion tokens, by forward passes over the completions.

    Z_t is the allowed mass of the *unconstrained* next-token distribution softmax(logits / T)
    at step t (the stop token's step included), i.e. ``w(y) = P_T(y) / q(y)``. Only the T + 1 last
    positions' logits are computed (``logits_to_keep``), ``batch_size`` rows at a time (default:
    as many as keep [rows, T + 1, V] within ``max_elements``, 256 MiB of float32), so memory stays
    bounded for a 150k vocabulary. During generation, ``IDLELogitsProcessor(track_temperature=T)``
    gives the same numbers without these passes.

    Prompts may be left- or right-padded: B(x, y_<t) reads them left-aligned, as ``generate`` sees them.

    Returns:
        [B] float32, <= 0.
    """
    temperature = checks.real("temperature", temperature, low=0.0, low_open=True)
    lm._check_inputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    c = constraints.as_constraint(banned_ids)
    context, _ = lm.left_align(prompt_ids, prompt_mask)  # B(x, y_<t) reads the prompt as generate sees it
    T, V = completion_ids.shape[1], lm._vocab_size(model)
    rows = (_rows_per_batch(T + 1, V, checks.integer("max_elements", max_elements, low=1)) if batch_size is None
            else checks.integer("batch_size", batch_size, low=1))
    out = []
    for s in range(0, prompt_ids.shape[0], rows):
        sl = slice(s, s + rows)
        logits = lm._forward(model, prompt_ids[sl], prompt_mask[sl], completion_ids[sl], completion_mask[sl],
                             logits_to_keep=T + 1).logits[:, :T]  # [b, T, V]: row t predicts token t
        logits = logits.float()
        if temperature < TINY_TEMPERATURE:  # logits / T could overflow: subtract the row maximum first
            logits = logits - logits.amax(-1, keepdim=True)
        logits = logits / temperature
        masks = constraints.iter_banned(c, context[sl], completion_ids[sl], logits.shape[-1])  # T x [b, V]
        log_allowed = [torch.logsumexp(logits[:, t].masked_fill(m, float("-inf")), -1) for t, m in zip(range(T), masks)]
        log_Z = torch.stack(log_allowed, 1) - torch.logsumexp(logits, -1)  # [b, T], -inf where nothing is allowed
        out.append(torch.where(completion_mask[sl].bool(), log_Z, torch.zeros_like(log_Z)).sum(-1))  # [b]
    return torch.cat(out)
