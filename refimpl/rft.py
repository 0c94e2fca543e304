r"""Rejection-sampling fine-tuning (RFT): the fine-tuning baseline of the Q-probe chapter.

Keep the model's own samples whose reward reaches a threshold and fine-tune on them by maximum
likelihood, L = -mean_t log pi_theta(y_t | x, y_<t) over the kept completions' tokens (the
"filtered behaviour cloning" step of ReST, Gulcehre et al. 2023, and of STaR, Zelikman et al.
2022, here for one round). The Q-probe paper sets Q-probes against fine-tuning when few
prompts are available; this is the cheapest version of that competitor.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from . import lm

__all__ = ["finetune_on_successes"]


def finetune_on_successes(model, samples: lm.Samples, rewards: Tensor, epochs: int = 3, lr: float = 3e-4,
                          batch_size: int = 64, min_reward: float = 1.0, seed: int = 0):
    """Fine-tune a copy of ``model`` on the rows of ``samples`` with ``rewards >= min_reward``.

    Args:
        model: the base causal LM (left untouched).
        samples: :class:`refimpl.lm.Samples` drawn from ``model``.
        rewards: [len(samples)] rewards of those rows.
        epochs, lr, batch_size: AdamW fine-tuning schedule (constant lr).
        seed: shuffling seed.

    Returns:
        ``(tuned_model, curve)``: the fine-tuned copy in eval mode and the mean per-token
        negative log-likelihood of each epoch (empty if no row was kept).
    """
    if not isinstance(rewards, Tensor) or rewards.shape != (len(samples),):
        raise ValueError(f"rewards must be a tensor of shape ({len(samples)},)")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    tuned = copy.deepcopy(model)
    keep = torch.nonzero(rewards.to(samples.completion_ids.device) >= min_reward).squeeze(1)  # [m]
    curve: list[float] = []
    if keep.numel() == 0:
        return tuned.eval(), curve
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    tuned.train()
    for _ in range(epochs):
        order = keep[torch.randperm(keep.numel(), generator=g).to(keep.device)]
        total, n_tok = 0.0, 0
        for s in range(0, order.numel(), batch_size):
            rows = order[s : s + batch_size]  # [b]
            mask = samples.completion_mask[rows]
            summed, _ = lm.sequence_logprobs(tuned, samples.prompt_ids[rows], samples.prompt_mask[rows],
                                             samples.completion_ids[rows], mask)
            n = mask.sum()
            loss = -summed.sum() / n  # mean token NLL of the kept completions
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n_tok = total + loss.detach() * n, n_tok + n
        curve.append(total / n_tok)
    return tuned.eval(), torch.stack(curve).tolist()
