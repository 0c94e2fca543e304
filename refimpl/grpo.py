r"""GRPO and Dr. GRPO, the baselines GVPO is compared with.

* GRPO (Shao et al. 2024, DeepSeekMath): group advantages A_i = (R_i - mean R)/(std R + eps), a
  PPO-clipped ratio to the sampling (old) policy per token, an optional penalty on the k3
  estimator of KL(pi_theta‖pi_ref), and a mean over each sequence's tokens.
* Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean R (no std)
  and token sums divided by a constant generation budget instead of each sequence's length.

All tensors are [P, k, T]: P prompts, k completions each, T tokens (right-padded, with a mask).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .gvpo import _centre, check_groups

__all__ = ["group_advantages", "grpo_loss", "dr_grpo_loss", "K3_CLAMP", "RATIO_CLAMP"]

K3_CLAMP = 20.0  # |log(pi_ref / pi_theta)| beyond this is clamped inside the k3 estimator
RATIO_CLAMP = 20.0  # |log(pi_theta / pi_old)| beyond this is clamped before the importance ratio's exp


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    r"""GRPO advantages (R_i - mean R) / (std R + eps), or Dr. GRPO's R_i - mean R (``scale=False``).

    Args:
        rewards: [P, k] rewards.
        scale: divide by the group's (unbiased) standard deviation.
        eps: added to the std, > 0, so all-equal groups give zero advantages, not NaN.

    Returns:
        [P, k] advantages, in the rewards' dtype (float32 for half-precision rewards, whose
        differences can overflow).
    """
    check_groups(rewards=rewards)
    scale = checks.boolean("scale", scale)
    eps = checks.real("eps", eps, low=0.0, low_open=True)
    adv = _advantages(rewards, scale, eps)
    if not bool(torch.isfinite(adv).all()):
        raise ValueError(f"rewards: the centred rewards overflow {adv.dtype}; rescale them or pass float64")
    return adv


def _advantages(rewards: Tensor, scale: bool, eps: float = 1e-4) -> Tensor:
    r = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()  # half: R_i - R_j overflows
    centred = _centre(r)
    std = r.std(dim=1, keepdim=True)
    adv = centred / (std + eps) if scale else centred
    if r.dtype == torch.float32:  # |R| >~ 1e19: the squares of the std (or the centring) overflow float32;
        r64 = r.double()  # those groups are recomputed in float64 (no host sync; others keep their float32 bits)
        adv64 = _centre(r64) / (r64.std(dim=1, keepdim=True) + eps) if scale else _centre(r64)
        ok = torch.isfinite(centred).all(1, keepdim=True) & torch.isfinite(std)  # [P, 1]
        adv = torch.where(ok, adv, adv64.to(torch.float32))
    return adv


def _clipped_surrogate(logp_tok: Tensor, logp_old_tok: Tensor, adv: Tensor, clip_eps: float) -> Tensor:
    """Per-token PPO objective min(ratio·A, clip(ratio)·A) (Schulman et al. 2017); [P, k, T].

    The log-ratio is clamped to [-RATIO_CLAMP, RATIO_CLAMP] before ``exp`` (as verl does): a policy
    200 nats from the sampler would give an infinite ratio, and inf·0 = NaN at A = 0. Half
    precision is computed in float32 (e^20 overflows float16)."""
    log_ratio = logp_tok - logp_old_tok.detach()  # [P, k, T]
    if log_ratio.dtype not in (torch.float32, torch.float64):
        log_ratio = log_ratio.float()
    ratio = torch.exp(log_ratio.clamp(-RATIO_CLAMP, RATIO_CLAMP))
    adv = adv.unsqueeze(-1)  # [P, k] -> [P, k, 1], one advantage per sequence
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def _finite_loss(loss: Tensor) -> Tensor:
    """The loss, or a clear error when it does not fit its dtype (rewards of 1e30 in float32, say)."""
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"the loss overflows {loss.dtype}: rescale the rewards (or pass float64 tensors)")
    return loss


def _check_token_inputs(logp_tok, logp_old_tok, mask, rewards, clip_eps, logp_ref_tok=None) -> float:
    checks.same_device(logp_tok=logp_tok, logp_old_tok=logp_old_tok, mask=mask, rewards=rewards,
                       logp_ref_tok=logp_ref_tok)  # first: the checks below read values
    if not isinstance(logp_tok, Tensor) or logp_tok.dim() != 3:
        raise ValueError(f"logp_tok must be a tensor of shape [prompts, k, T], got "
                         f"{tuple(logp_tok.shape) if isinstance(logp_tok, Tensor) else type(logp_tok).__name__}")
    check_groups(logp_tok=logp_tok, logp_old_tok=logp_old_tok, mask=mask)
    if logp_tok.dim() != 3:
        raise ValueError(f"logp_tok must have shape [prompts, k, T], got {tuple(logp_tok.shape)}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold only 0 and 1")
    check_groups(rewards=rewards)
    if rewards.shape != logp_tok.shape[:2]:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but logp_tok has groups {tuple(logp_tok.shape[:2])}")
    return checks.real("clip_eps", clip_eps, low=0.0, high=1.0, low_open=True, high_open=True)


def _grpo_loss(logp_tok, logp_old_tok, mask, rewards, clip_eps, kl_coef, logp_ref_tok):
    """:func:`grpo_loss` without checks."""
    per_token = _clipped_surrogate(logp_tok, logp_old_tok, _advantages(rewards, True), clip_eps)
    if kl_coef > 0:
        # log(pi_ref / pi_theta) per token, clamped to [-20, 20] as verl does, so that exp() stays
        # finite when the policy has moved far from the reference (the true k3 is then astronomic)
        log_ratio = logp_ref_tok.detach() - logp_tok  # [P, k, T]
        log_ratio = (log_ratio if log_ratio.dtype in (torch.float32, torch.float64) else log_ratio.float())
        log_ratio = log_ratio.clamp(-K3_CLAMP, K3_CLAMP)
        per_token = per_token - kl_coef * (log_ratio.exp() - log_ratio - 1)  # k3 estimator
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [P, k] token mean
    return -per_seq.mean()


def grpo_loss(logp_tok: Tensor, logp_old_tok: Tensor, mask: Tensor, rewards: Tensor, clip_eps: float = 0.2,
              kl_coef: float = 0.0, logp_ref_tok: Tensor | None = None) -> Tensor:
    r"""GRPO: -mean_{i} 1/len(y_i) sum_t [min(ratio·A_i, clip(ratio)·A_i) - kl_coef·k3_t].

    A_i = (R_i - mean R)/(std R + eps); ratio = pi_theta/pi_old per token; the k3 estimator
    k3_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 of KL(pi_theta‖pi_ref) per token
    (Shao et al. 2024, eq. 3-4), with the log-ratio clamped to [-K3_CLAMP, K3_CLAMP] (as verl does)
    so the penalty stays finite. Tokens are averaged within each sequence, then over sequences.

    Args:
        logp_tok: [P, k, T] per-token log pi_theta (carrying the graph), 0 on padding.
        logp_old_tok: [P, k, T] per-token log-probs of the sampling (old) policy.
        mask: [P, k, T] 1.0 on real completion tokens.
        rewards: [P, k] rewards.
        clip_eps: PPO clip range, in (0, 1).
        kl_coef: weight of the k3 penalty, >= 0; needs ``logp_ref_tok`` when > 0.
        logp_ref_tok: [P, k, T] per-token log pi_ref.

    Returns:
        Scalar loss (float32 for half-precision input). A loss too large for its dtype raises ``ValueError``.
    """
    clip_eps = _check_token_inputs(logp_tok, logp_old_tok, mask, rewards, clip_eps, logp_ref_tok)
    kl_coef = checks.real("kl_coef", kl_coef, low=0.0)
    if kl_coef > 0 and logp_ref_tok is None:
        raise ValueError("logp_ref_tok is required when kl_coef > 0")
    if logp_ref_tok is not None:
        check_groups(logp_tok=logp_tok, logp_ref_tok=logp_ref_tok)
    return _finite_loss(_grpo_loss(logp_tok, logp_old_tok, mask, rewards, clip_eps, kl_coef, logp_ref_tok))


def _dr_grpo_loss(logp_tok, logp_old_tok, mask, rewards, clip_eps, max_tokens):
    """:func:`dr_grpo_loss` without checks."""
    per_token = _clipped_surrogate(logp_tok, logp_old_tok, _advantages(rewards, False), clip_eps)
    P, k = rewards.shape
    return -(per_token * mask).sum() / (P * k * max_tokens)


def dr_grpo_loss(logp_tok: Tensor, logp_old_tok: Tensor, mask: Tensor, rewards: Tensor, clip_eps: float = 0.2,
                 max_tokens: int | None = None) -> Tensor:
    r"""Dr. GRPO: -1/(P·k·T_max) sum_{i,t} min(ratio·A_i, clip(ratio)·A_i), A_i = R_i - mean R.

    No std division and no 1/len(y_i) (Liu et al. 2025): token terms are summed and divided by a
    constant, the generation budget T_max, so long and short sequences weigh the same per token.

    Args:
        logp_tok, logp_old_tok, mask: [P, k, T] as in :func:`grpo_loss`.
        rewards: [P, k] rewards.
        clip_eps: PPO clip range, in (0, 1).
        max_tokens: the constant T_max >= 1 (default: T, the padded length).

    Returns:
        Scalar loss.
    """
    clip_eps = _check_token_inputs(logp_tok, logp_old_tok, mask, rewards, clip_eps)
    T_max = logp_tok.shape[-1] if max_tokens is None else checks.integer("max_tokens", max_tokens, low=1)
    return _finite_loss(_dr_grpo_loss(logp_tok, logp_old_tok, mask, rewards, clip_eps, T_max))
