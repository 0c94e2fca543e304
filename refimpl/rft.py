r"""Rejection-sampling fine-tuning (RFT): the fine-tuning baseline of the Q-probe chapter.

Keep the model's own samples whose reward reaches a threshold and fine-tune on them by maximum
likelihood, L = -mean_t log pi_theta(y_t | x, y_<t) over the kept completions' tokens (the
"filtered behaviour cloning" step of ReST, Gulcehre et al. 2023, and of STaR, Zelikman et al.
2022, here for one round). The Q-probe paper sets Q-probes against fine-tuning when few
prompts are available; this is the cheapest version of that competitor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks, lm

__all__ = ["finetune_on_successes"]


def finetune_on_successes(model, samples: lm.Samples, rewards: Tensor, epochs: int = 3, lr: float = 3e-4,
                          batch_size: int = 64, min_reward: float = 1.0, seed: int = 0,
                          steps: int | None = None) -> list[float]:
    """Fine-tune ``model`` in place on the rows of ``samples`` with ``rewards >= min_reward``.

    Rows with an empty completion carry no token to learn from and are skipped. The model is left
    in eval mode (copy it first to keep the original: ``copy.deepcopy(model)``).

    Args:
        model: the causal LM to fine-tune (modified in place).
        samples: :class:`refimpl.lm.Samples` (drawn from ``model``, typically).
        rewards: [len(samples)] rewards of those rows.
        epochs, lr, batch_size: AdamW fine-tuning schedule (constant lr, no weight decay); only the
            parameters that require a gradient move (a ``peft`` LoRA model trains its adapters).
        seed: shuffling seed.
        steps: if given, exactly this many optimizer steps (passes over the kept rows, reshuffled,
            as many as needed; ``epochs`` is ignored): budgets matched across data sizes.

    Returns:
        The mean per-token negative log-likelihood of each pass (empty if no row was kept).
    """
    if not isinstance(samples, lm.Samples):
        raise TypeError(f"samples must be refimpl.lm.Samples, got {type(samples).__name__}")
    checks.tensor("rewards", rewards, dims=1)
    if rewards.shape[0] != len(samples):
        raise ValueError(f"rewards must have shape ({len(samples)},), got {tuple(rewards.shape)}")
    checks.finite("rewards", rewards.float())
    epochs = checks.integer("epochs", epochs, low=1)
    if steps is not None:
        steps = checks.integer("steps", steps, low=1)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    lr = checks.real("lr", lr, low=0.0, low_open=True)
    min_reward = checks.real("min_reward", min_reward)
    lm._check_inputs(model, samples.prompt_ids, samples.prompt_mask, samples.completion_ids, samples.completion_mask)
    device = samples.completion_ids.device
    keep_rows = (rewards.to(device) >= min_reward) & (samples.completion_mask.sum(1) > 0)
    keep = torch.nonzero(keep_rows).squeeze(1)  # [m]
    curve: list[Tensor] = []
    if keep.numel() == 0:
        return []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(checks.integer("seed", seed))
    model.train()
    done = 0
    for _ in range(epochs if steps is None else steps):
        if steps is not None and done >= steps:
            break
        order = keep[torch.randperm(keep.numel(), generator=g).to(keep.device)]
        total, n_tok = 0.0, 0
        for s in range(0, order.numel(), batch_size):
            if steps is not None and done >= steps:
                break
            done += 1
            rows = order[s : s + batch_size]  # [b]
            mask = samples.completion_mask[rows]
            summed, _ = lm._sequence_logprobs(model, samples.prompt_ids[rows], samples.prompt_mask[rows],
                                              samples.completion_ids[rows], mask)
            n = mask.sum()  # > 0: every kept row has a real token
            loss = -summed.sum() / n  # mean token NLL of the kept completions
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n_tok = total + loss.detach() * n, n_tok + n
        curve.append(total / n_tok)
    model.eval()
    return torch.stack(curve).tolist()
