r"""Offline fine-tuning of a language model on its own samples: rejection-sampling fine-tuning
(RFT), the fine-tuning baseline of the Q-probe chapter, and DPO on labelled pairs of samples.

Keep the model's own samples whose reward reaches a threshold and fine-tune on them by maximum
likelihood, L = -mean_t log pi_theta(y_t | x, y_<t) over the kept completions' tokens (the
"filtered behaviour cloning" step of ReST, Gulcehre et al. 2023, and of STaR, Zelikman et al.
2022, here for one round). The Q-probe paper sets Q-probes against fine-tuning when few
prompts are available; this is the cheapest version of that competitor. :func:`finetune_dpo`
trains on preference pairs of the samples instead (:mod:`refimpl.dpo` has the loss and its exact
analysis on a finite support).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import checks, dpo, lm

__all__ = ["finetune_on_successes", "finetune_dpo"]


def finetune_on_successes(model, samples: lm.Samples, rewards: Tensor, epochs: int = 3, lr: float = 3e-4,
                          batch_size: int = 64, min_reward: float = 1.0, seed: int = 0,
                          steps: int | None = None,
                          callback: Callable[[int, torch.nn.Module], None] | None = None) -> list[float]:
    """Fine-tune ``model`` in place on the rows of ``samples`` with ``rewards >= min_reward``.

    Rows with an empty completion carry no token to learn from and are skipped. The model is left
    in eval mode (copy it first to keep the original: ``copy.deepcopy(model)``).

    Args:
        model: the causal LM to fine-tune (modified in place).
        samples: :class:`refimpl.lm.Samples` (drawn from ``model``, typically).
        rewards: [len(samples)] rewards of those rows (from any device: they are moved to the samples').
        epochs, lr, batch_size: AdamW fine-tuning schedule (constant lr, no weight decay); only the
            parameters that require a gradient move (a ``peft`` LoRA model trains its adapters).
        seed: shuffling seed.
        steps: if given, exactly this many optimizer steps (passes over the kept rows, reshuffled,
            as many as needed; ``epochs`` is ignored): budgets matched across data sizes.
        callback: ``callback(steps_done, model)`` after every optimizer step, with the model in eval
            mode (to evaluate checkpoints, e.g. choose the number of steps on validation prompts).

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
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
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
            if callback is not None:
                model.eval()
                callback(done, model)
                model.train()
        curve.append(total / n_tok)
    model.eval()
    return torch.stack(curve).tolist()


def finetune_dpo(policy, ref, samples: lm.Samples, chosen: Tensor, rejected: Tensor, beta: float, steps: int,
                 lr: float = 3e-4, batch_size: int = 32, max_grad_norm: float = 1.0, seed: int = 0,
                 callback: Callable[[int, torch.nn.Module], None] | None = None) -> list[float]:
    r"""DPO on a causal LM: ``steps`` AdamW updates of ``policy`` (in place), each on the mean of
    :func:`refimpl.dpo.dpo_loss`, -log sigma(beta·[h(y_c) - h(y_r)]) with h = log pi_theta - log pi_ref, over ``batch_size`` pairs drawn with replacement, gradient norm clipped at
    ``max_grad_norm`` (as :func:`refimpl.rl.train`); log pi_ref of every row is computed once.

    Args:
        policy, ref: the policy (trained, kept in eval mode: dropout off) and the reference model.
        samples: :class:`refimpl.lm.Samples` on the models' device; pair i is row ``chosen[i]`` ≻ row
            ``rejected[i]``, two different rows answering the same prompt ([M] integer tensors, from
            any device: they are moved to the samples').
        beta: > 0. steps, batch_size: >= 1. lr, max_grad_norm: > 0. seed: of the pair draws.
        callback: ``callback(steps_done, policy)`` after every step (to evaluate checkpoints).

    Returns:
        The loss of every step.
    """
    if not isinstance(samples, lm.Samples):
        raise TypeError(f"samples must be a refimpl.lm.Samples, got {type(samples).__name__}")
    checks.same_device(policy=lm._device(policy), ref=lm._device(ref), samples=samples.device)
    if policy is ref:
        raise ValueError("ref must be a separate model from policy (a frozen copy: copy.deepcopy(policy)); "
                         "the same module would move the reference along with the policy")
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        if checks.tensor(name, t, dims=1, integral=True).dtype == torch.bool:
            raise TypeError(f"{name} must hold integer row indices, not a boolean mask")
        if not t.numel() or not 0 <= t.min() <= t.max() < len(samples):
            raise ValueError(f"{name} must hold row indices of samples, in [0, {len(samples)})")
    checks.same_shape(chosen=chosen, rejected=rejected)
    dev = samples.completion_ids.device
    chosen, rejected = chosen.to(dev), rejected.to(dev)
    if bool(((samples.prompt_index[chosen] != samples.prompt_index[rejected]) | (chosen == rejected)).any()):
        raise ValueError("each pair (chosen[i], rejected[i]) must be two different rows answering the same prompt")
    beta, lr = checks.beta(beta), checks.real("lr", lr, low=0.0, low_open=True)
    steps, batch_size = checks.integer("steps", steps, low=1), checks.integer("batch_size", batch_size, low=1)
    max_grad_norm = checks.real("max_grad_norm", max_grad_norm, low=0.0, low_open=True, allow_inf=True)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    g = torch.Generator().manual_seed(checks.integer("seed", seed, low=0))
    args = lambda rows: (samples.prompt_ids[rows], samples.prompt_mask[rows], samples.completion_ids[rows],  # noqa: E731
                         samples.completion_mask[rows])
    with torch.no_grad():
        logp_ref = lm._sequence_logprobs(ref, *args(torch.arange(len(samples), device=dev)))[0]
    opt = torch.optim.AdamW(policy.eval().parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        b = torch.randint(len(chosen), (batch_size,), generator=g).to(dev)
        c, r = chosen[b], rejected[b]
        logp = lm._sequence_logprobs(policy, *args(torch.cat([c, r])))[0]  # [2B]
        loss = dpo.dpo_loss(logp[:batch_size], logp[batch_size:], logp_ref[c], logp_ref[r], beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        opt.step()
        losses.append(loss.detach())
        if callback is not None:
            callback(step + 1, policy)
    return torch.stack(losses).cpu().tolist()
