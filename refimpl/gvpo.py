r"""GVPO (Zhang et al. 2025, "GVPO: Group Variance Policy Optimization", arXiv 2504.19599) and
the GRPO / Dr. GRPO baselines it is compared with.

For each prompt, k >= 2 completions y_1..y_k drawn from any sampling distribution, sequence
log-probs summed over completion tokens, rho_i = log pi_theta(y_i) - log pi_anchor(y_i):

* weights   w_i = (R_i - mean R) - beta (rho_i - mean rho)                        (GVPO weights)
* loss      L = 1/(k-1) · ½ · sum_i [beta (rho_i - mean rho) - (R_i - mean R)]^2   (per prompt,
  averaged over prompts), whose gradient is -beta/(k-1) · sum_i w_i ∇ log pi_theta(y_i).

Its unique minimiser (for full-support sampling) is pi* = pi_anchor · exp(R/beta) / Z: the
implicit reward beta·rho + beta·log Z matches R up to a constant that centring removes.
``anchor="reference"`` fixes pi_anchor = pi_ref (the KL-regularised objective);
``anchor="old"`` uses the policy at the start of each step, as the authors' code does.

Baselines: GRPO (Shao et al. 2024; group mean/std advantages, PPO-clipped ratio to the old
policy, optional k3 KL penalty to a reference, mean over each sequence's tokens) and Dr. GRPO
(Liu et al. 2025; no std, token sums divided by a constant generation budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import lm
from .kl import _check_beta  # one definition of a valid beta

__all__ = [
    "gvpo_weights",
    "gvpo_loss",
    "group_advantages",
    "grpo_loss",
    "dr_grpo_loss",
    "train_tabular",
    "GVPOConfig",
    "train",
]


# --- validation -------------------------------------------------------------------------------

def _check_groups(**tensors: Tensor) -> None:
    """Every tensor [P, k, ...] with the shape of the first, k >= 2, floating and finite."""
    first_name = next(iter(tensors))
    first = tensors[first_name]
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [prompts, k, ...], got {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}: "
                             "every group must hold the same k completions")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} must be finite")
    if first.shape[1] < 2:
        raise ValueError(f"k (dim 1 of {first_name}) must be >= 2, got {first.shape[1]}")


def _centre(x: Tensor) -> Tensor:
    """x - mean over the group (dim 1)."""
    return x - x.mean(dim=1, keepdim=True)


# --- GVPO --------------------------------------------------------------------------------------

def gvpo_weights(logp: Tensor, logp_anchor: Tensor, rewards: Tensor, beta: float) -> Tensor:
    r"""w_i = (R_i - mean R) - beta (rho_i - mean rho), rho = log pi_theta - log pi_anchor.

    Args:
        logp: [P, k] sequence log pi_theta(y_i | x) (summed over completion tokens).
        logp_anchor: [P, k] sequence log pi_anchor(y_i | x).
        rewards: [P, k] R(x, y_i).
        beta: KL coefficient, > 0.

    Returns:
        [P, k] detached weights; they sum to zero in each group and vanish at pi*.
    """
    _check_beta(beta)
    _check_groups(logp=logp, logp_anchor=logp_anchor, rewards=rewards)
    rho = (logp - logp_anchor).detach()  # [P, k]
    return _centre(rewards) - beta * _centre(rho)


def gvpo_loss(logp: Tensor, logp_anchor: Tensor, rewards: Tensor, beta: float) -> Tensor:
    r"""L = mean_prompts 1/(k-1) · ½ · sum_i [beta (rho_i - mean rho) - (R_i - mean R)]^2.

    The MSE between the centred implicit reward beta·rho and the centred reward; its gradient is
    -beta/(k-1) · sum_i w_i ∇ log pi_theta(y_i) / P with w from :func:`gvpo_weights`.

    Args:
        logp: [P, k] sequence log pi_theta, carrying the graph.
        logp_anchor: [P, k] sequence log pi_anchor (treated as a constant).
        rewards: [P, k] rewards.
        beta: KL coefficient, > 0.

    Returns:
        Scalar loss, >= 0, zero exactly when beta·rho - R is constant in every group.
    """
    _check_beta(beta)
    _check_groups(logp=logp, logp_anchor=logp_anchor, rewards=rewards)
    k = logp.shape[1]
    rho = logp - logp_anchor.detach()  # [P, k]
    residual = beta * _centre(rho) - _centre(rewards)  # [P, k]
    return (0.5 * residual.pow(2).sum(dim=1) / (k - 1)).mean()


# --- GRPO and Dr. GRPO ---------------------------------------------------------------------------

def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    r"""GRPO advantages (R_i - mean R) / (std R + eps), or Dr. GRPO's R_i - mean R (``scale=False``).

    Args:
        rewards: [P, k] rewards.
        scale: divide by the group's (unbiased) standard deviation.
        eps: added to the std, so all-equal groups give zero advantages, not NaN.

    Returns:
        [P, k] advantages.
    """
    _check_groups(rewards=rewards)
    adv = _centre(rewards)
    if scale:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def _clipped_surrogate(logp_tok: Tensor, logp_old_tok: Tensor, adv: Tensor, clip_eps: float) -> Tensor:
    """Per-token PPO objective min(ratio·A, clip(ratio)·A) (Schulman et al. 2017); [P, k, T]."""
    ratio = torch.exp(logp_tok - logp_old_tok.detach())  # [P, k, T]
    adv = adv.unsqueeze(-1)  # [P, k] -> [P, k, 1], one advantage per sequence
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def _check_token_inputs(logp_tok, logp_old_tok, mask, rewards, clip_eps):
    _check_groups(logp_tok=logp_tok, logp_old_tok=logp_old_tok, mask=mask)
    if logp_tok.dim() != 3:
        raise ValueError(f"logp_tok must have shape [prompts, k, T], got {tuple(logp_tok.shape)}")
    _check_groups(rewards=rewards)
    if rewards.shape != logp_tok.shape[:2]:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but logp_tok has groups {tuple(logp_tok.shape[:2])}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")


def grpo_loss(logp_tok: Tensor, logp_old_tok: Tensor, mask: Tensor, rewards: Tensor, clip_eps: float = 0.2,
              kl_coef: float = 0.0, logp_ref_tok: Tensor | None = None) -> Tensor:
    r"""GRPO: -mean_{i} 1/len(y_i) sum_t [min(ratio·A_i, clip(ratio)·A_i) - kl_coef·k3_t].

    A_i = (R_i - mean R)/(std R + eps); ratio = pi_theta/pi_old per token; the k3 estimator
    k3_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 of KL(pi_theta‖pi_ref) per token
    (Shao et al. 2024, eq. 3-4). Tokens are averaged within each sequence, then over sequences.

    Args:
        logp_tok: [P, k, T] per-token log pi_theta (carrying the graph), 0 on padding.
        logp_old_tok: [P, k, T] per-token log-probs of the sampling (old) policy.
        mask: [P, k, T] 1.0 on real completion tokens.
        rewards: [P, k] rewards.
        clip_eps: PPO clip range.
        kl_coef: weight of the k3 penalty; needs ``logp_ref_tok`` when > 0.
        logp_ref_tok: [P, k, T] per-token log pi_ref.

    Returns:
        Scalar loss.
    """
    _check_token_inputs(logp_tok, logp_old_tok, mask, rewards, clip_eps)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    per_token = _clipped_surrogate(logp_tok, logp_old_tok, group_advantages(rewards), clip_eps)
    if kl_coef > 0:
        if logp_ref_tok is None:
            raise ValueError("logp_ref_tok is required when kl_coef > 0")
        _check_groups(logp_tok=logp_tok, logp_ref_tok=logp_ref_tok)
        log_ratio = logp_ref_tok.detach() - logp_tok  # [P, k, T] log(pi_ref / pi_theta)
        per_token = per_token - kl_coef * (log_ratio.exp() - log_ratio - 1)  # k3 estimator
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [P, k] token mean
    return -per_seq.mean()


def dr_grpo_loss(logp_tok: Tensor, logp_old_tok: Tensor, mask: Tensor, rewards: Tensor, clip_eps: float = 0.2,
                 max_tokens: int | None = None) -> Tensor:
    r"""Dr. GRPO: -1/(P·k·T_max) sum_{i,t} min(ratio·A_i, clip(ratio)·A_i), A_i = R_i - mean R.

    No std division and no 1/len(y_i) (Liu et al. 2025): token terms are summed and divided by a
    constant, the generation budget T_max, so long and short sequences weigh the same per token.

    Args:
        logp_tok, logp_old_tok, mask: [P, k, T] as in :func:`grpo_loss`.
        rewards: [P, k] rewards.
        clip_eps: PPO clip range.
        max_tokens: the constant T_max (default: T, the padded length).

    Returns:
        Scalar loss.
    """
    _check_token_inputs(logp_tok, logp_old_tok, mask, rewards, clip_eps)
    T_max = logp_tok.shape[-1] if max_tokens is None else max_tokens
    if not isinstance(T_max, int) or T_max < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    per_token = _clipped_surrogate(logp_tok, logp_old_tok, group_advantages(rewards, scale=False), clip_eps)
    P, k = rewards.shape
    return -(per_token * mask).sum() / (P * k * T_max)


# --- a tabular policy over a finite support (the exact world) -----------------------------------

def train_tabular(logp_ref: Tensor, reward: Tensor, beta: float, loss: str = "gvpo", sampling: str = "policy",
                  anchor: str = "reference", k: int = 8, steps: int = 500, lr: float = 0.1, kl_coef: float = 0.0,
                  seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    r"""Train logits theta [P, N] (initialised at log pi_ref) on k sampled completions per prompt.

    1. sample k indices per prompt from ``sampling``: "policy" (on-policy pi_theta), "uniform",
       or "reference" (a stale snapshot: pi_ref, never refreshed);
    2. gather log pi_theta, log pi_anchor and R at them: [P, k];
    3. one SGD step on P times the loss (prompts have separate logits, so each prompt gets the
       step size of a lone group); GRPO variants see each completion as one token, T = 1.

    Args:
        logp_ref: [P, N] log pi_ref; reward: [P, N] R(x, y); beta: GVPO's KL coefficient.
        loss: "gvpo" | "grpo" | "dr_grpo"; anchor: GVPO's "reference" or "old".
        kl_coef: GRPO's k3 penalty weight.

    Returns:
        ``(logp [P, N], history)``: the final log pi_theta and log pi_theta after every step.
    """
    _check_beta(beta)
    if sampling not in ("policy", "uniform", "reference"):
        raise ValueError(f"sampling must be 'policy', 'uniform' or 'reference', got {sampling!r}")
    if loss not in ("gvpo", "grpo", "dr_grpo") or anchor not in ("reference", "old"):
        raise ValueError(f"loss/anchor must be gvpo|grpo|dr_grpo / reference|old, got {loss!r}/{anchor!r}")
    theta = torch.nn.Parameter(logp_ref.detach().clone())  # [P, N]
    opt = torch.optim.SGD([theta], lr=lr)
    g = torch.Generator(device=logp_ref.device).manual_seed(seed)
    rows = torch.arange(logp_ref.shape[0], device=logp_ref.device).unsqueeze(1)  # [P, 1]
    history = []
    for _ in range(steps):
        logp_all = torch.log_softmax(theta, dim=-1)  # [P, N]
        probs = {"policy": logp_all, "uniform": torch.zeros_like(logp_ref), "reference": logp_ref}[sampling]
        idx = torch.multinomial(probs.detach().softmax(-1), k, replacement=True, generator=g)  # [P, k]
        logp, R = logp_all[rows, idx], reward[rows, idx]  # [P, k]
        if loss == "gvpo":
            logp_anchor = logp_ref[rows, idx] if anchor == "reference" else logp.detach()
            value = gvpo_loss(logp, logp_anchor, R, beta)
        else:
            tok = logp.unsqueeze(-1)  # [P, k] -> [P, k, 1]: one "token" per completion
            mask = torch.ones_like(tok)
            if loss == "grpo":
                value = grpo_loss(tok, tok.detach(), mask, R, kl_coef=kl_coef,
                                  logp_ref_tok=logp_ref[rows, idx].unsqueeze(-1))
            else:
                value = dr_grpo_loss(tok, tok.detach(), mask, R)
        opt.zero_grad(set_to_none=True)
        (value * logp_ref.shape[0]).backward()
        opt.step()
        history.append(torch.log_softmax(theta.detach(), dim=-1))
    return history[-1], history


# --- the training loop ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GVPOConfig:
    """One run of :func:`train`."""

    loss: str = "gvpo"  # "gvpo" | "grpo" | "dr_grpo"
    anchor: str = "reference"  # GVPO's pi_anchor: "reference" (fixed pi_ref) or "old" (policy at step start)
    beta: float = 0.1  # GVPO's KL coefficient
    kl_coef: float = 0.0  # GRPO's k3 penalty weight (ignored by the other losses)
    clip_eps: float = 0.2  # GRPO / Dr. GRPO clip range
    k: int = 4  # completions per prompt (group size)
    prompts_per_step: int = 16  # prompts drawn (without replacement) per step
    steps: int = 40  # sampling steps
    updates_per_batch: int = 1  # gradient steps on each sampled batch
    lr: float = 1e-4  # AdamW learning rate (weight decay 0)
    max_grad_norm: float = 1.0  # gradient clipping (inf: none; the norm is logged either way)
    max_new_tokens: int = 8  # generation budget (Dr. GRPO's T_max)
    temperature: float = 1.0  # sampling temperature (log-probs use the same)
    seed: int = 0  # prompt order and sampling seeds


def _check_config(config: GVPOConfig) -> None:
    if not isinstance(config, GVPOConfig):
        raise TypeError(f"config must be a GVPOConfig, got {type(config).__name__}")
    if config.loss not in ("gvpo", "grpo", "dr_grpo"):
        raise ValueError(f"config.loss must be 'gvpo', 'grpo' or 'dr_grpo', got {config.loss!r}")
    if config.anchor not in ("reference", "old"):
        raise ValueError(f"config.anchor must be 'reference' or 'old', got {config.anchor!r}")
    _check_beta(config.beta)
    if not isinstance(config.k, int) or config.k < 2:
        raise ValueError(f"config.k must be an int >= 2, got {config.k!r}")
    for name in ("prompts_per_step", "steps", "updates_per_batch", "max_new_tokens"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ValueError(f"config.{name} must be a positive int, got {getattr(config, name)!r}")


def _step_loss(config: GVPOConfig, logp_tok, mask, old_tok, ref_tok, rewards) -> Tensor:
    """The configured loss on one batch; all token tensors [P, k, T], rewards [P, k]."""
    if config.loss == "gvpo":
        anchor_tok = ref_tok if config.anchor == "reference" else old_tok
        return gvpo_loss(logp_tok.sum(-1), anchor_tok.sum(-1), rewards, config.beta)
    if config.loss == "grpo":
        return grpo_loss(logp_tok, old_tok, mask, rewards, config.clip_eps, config.kl_coef, ref_tok)
    return dr_grpo_loss(logp_tok, old_tok, mask, rewards, config.clip_eps, config.max_new_tokens)


def train(policy, ref, tokenizer, prompts: Sequence[str], targets: Sequence, reward_fn: Callable,
          config: GVPOConfig = GVPOConfig(), disable_progress: bool = False) -> dict[str, list[float]]:
    r"""Train ``policy`` in place with GVPO, GRPO or Dr. GRPO on sampled groups.

    Each step:
      1. draw ``prompts_per_step`` prompts and k completions each from the policy (``lm.sample``);
      2. score them: ``reward_fn(texts, targets) -> [P·k]`` rewards;
      3. per-token log-probs of ``ref`` (no grad);
      4. ``updates_per_batch`` times: policy log-probs with grad, the configured loss, AdamW step;
         the first update's log-probs, detached, are the old policy's (no extra forward).

    The policy stays in eval mode (dropout off), as usual for RL fine-tuning of LMs.

    Args:
        policy: causal LM to train (modified in place).
        ref: the frozen reference model pi_ref (same tokenizer); never updated.
        prompts, targets: the prompt pool and what ``reward_fn`` needs for each prompt.
        reward_fn: ``(texts, targets) -> Tensor [n]``.
        config: :class:`GVPOConfig`.
        disable_progress: hide the tqdm bar.

    Returns:
        Per-step metrics: ``reward/mean``, ``reward/solved_frac`` (groups with a nonzero reward),
        ``kl/ref`` (the k1 estimate mean_i log pi_old(y_i)/pi_ref(y_i) over the sampled
        completions), ``loss``, ``grad/norm`` (before clipping, last update of the step),
        ``len/mean`` (completion tokens).
    """
    from tqdm.auto import tqdm

    _check_config(config)
    if len(prompts) != len(targets):
        raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}")
    n_prompts = min(config.prompts_per_step, len(prompts))
    device = next(policy.parameters()).device
    policy.eval()  # dropout off for sampling and for the update alike
    opt = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)
    keys = ["reward/mean", "reward/solved_frac", "kl/ref", "loss", "grad/norm", "len/mean"]
    logs: dict[str, list[Tensor]] = {key: [] for key in keys}
    for step in tqdm(range(config.steps), disable=disable_progress, desc=f"{config.loss}"):
        idx = torch.randperm(len(prompts), generator=g)[:n_prompts].tolist()
        batch_prompts = [prompts[i] for i in idx]
        batch_targets = [targets[i] for i in idx for _ in range(config.k)]  # prompt-major, k each
        s = lm.sample(policy, tokenizer, batch_prompts, k=config.k, max_new_tokens=config.max_new_tokens,
                      temperature=config.temperature, seed=config.seed * 1_000_003 + step)
        rewards = reward_fn(s.texts, batch_targets).to(device).float().view(n_prompts, config.k)  # [P*k] -> [P, k]
        args = (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, config.temperature)
        shape = (n_prompts, config.k, -1)  # [P*k, T] -> [P, k, T]
        with torch.no_grad():
            ref_tok = lm.sequence_logprobs(ref, *args)[1].view(shape)
        mask = s.completion_mask.float().view(shape)
        for update in range(config.updates_per_batch):
            logp_tok = lm.sequence_logprobs(policy, *args)[1].view(shape)
            if update == 0:  # the policy has not moved yet: its log-probs are the old ones
                old_tok = logp_tok.detach()
            loss = _step_loss(config, logp_tok, mask, old_tok, ref_tok, rewards)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            opt.step()
        logs["reward/mean"].append(rewards.mean())
        logs["reward/solved_frac"].append((rewards.max(dim=1).values > 0).float().mean())
        logs["kl/ref"].append((old_tok - ref_tok).sum(-1).mean())
        logs["loss"].append(loss.detach())
        logs["grad/norm"].append(grad_norm.detach())
        logs["len/mean"].append(mask.sum(-1).mean())
    return {key: torch.stack(v).cpu().tolist() for key, v in logs.items()}  # one host sync, at the end
