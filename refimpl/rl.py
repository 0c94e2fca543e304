r"""Training a policy on groups of k completions per prompt: one loss table, two trainers.

Every loss of :data:`LOSSES` takes a :class:`GroupBatch` and an :class:`RLConfig` and returns a
scalar: GVPO (:mod:`refimpl.gvpo`), GRPO and Dr. GRPO (:mod:`refimpl.grpo`). The same table
serves :func:`train_tabular` (a table of logits over a finite support, the exact world) and
:func:`train` (a causal LM on sampled completions). A config option that the chosen loss does not
use must stay at its default: setting it is an error, never silently ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import checks, lm
from .gvpo import _gvpo_loss
from .grpo import _dr_grpo_loss, _grpo_loss

__all__ = ["GroupBatch", "RLConfig", "LOSSES", "TrainLog", "TabularRun", "train", "train_tabular"]


@dataclass(frozen=True)
class GroupBatch:
    """What a loss sees: k completions for each of P prompts, per token."""

    logp_tok: Tensor  # [P, k, T] log pi_theta per token, carrying the graph (0 on padding)
    old_tok: Tensor  # [P, k, T] log-probs of the policy that sampled them (no graph)
    ref_tok: Tensor  # [P, k, T] log pi_ref per token (no graph)
    mask: Tensor  # [P, k, T] 1.0 on real completion tokens
    rewards: Tensor  # [P, k]
    max_tokens: int  # the generation budget T_max (Dr. GRPO's constant)


def _gvpo(b: GroupBatch, c: "RLConfig") -> Tensor:
    anchor = b.ref_tok if c.anchor == "reference" else b.old_tok
    return _gvpo_loss(b.logp_tok.sum(-1), anchor.sum(-1), b.rewards, c.beta)


def _grpo(b: GroupBatch, c: "RLConfig") -> Tensor:
    return _grpo_loss(b.logp_tok, b.old_tok, b.mask, b.rewards, c.clip_eps, c.kl_coef, b.ref_tok)


def _dr_grpo(b: GroupBatch, c: "RLConfig") -> Tensor:
    return _dr_grpo_loss(b.logp_tok, b.old_tok, b.mask, b.rewards, c.clip_eps, b.max_tokens)


class Loss(NamedTuple):
    fn: Callable[[GroupBatch, "RLConfig"], Tensor]  # (batch, config) -> scalar loss
    options: tuple[str, ...]  # the loss-specific config fields it reads


LOSSES: dict[str, Loss] = {
    "gvpo": Loss(_gvpo, ("anchor", "beta")),
    "grpo": Loss(_grpo, ("clip_eps", "kl_coef")),
    "dr_grpo": Loss(_dr_grpo, ("clip_eps",)),
}
_LOSS_OPTIONS = ("anchor", "beta", "clip_eps", "kl_coef")


@dataclass(frozen=True)
class RLConfig:
    """One training run (:func:`train`; :func:`train_tabular` uses the first block and ``k``,
    ``steps``, ``lr``, ``seed``)."""

    loss: str = "gvpo"  # a key of LOSSES
    anchor: str = "reference"  # GVPO's pi_anchor: "reference" (fixed pi_ref) or "old" (policy at step start)
    beta: float = 0.1  # GVPO's KL coefficient, > 0
    clip_eps: float = 0.2  # GRPO / Dr. GRPO clip range, in (0, 1)
    kl_coef: float = 0.0  # GRPO's k3 penalty weight, >= 0
    k: int = 4  # completions per prompt (group size), >= 2
    prompts_per_step: int = 16  # prompts drawn (without replacement) per step
    steps: int = 40  # sampling steps
    updates_per_batch: int = 1  # gradient steps on each sampled batch
    lr: float = 1e-4  # learning rate (AdamW for the LM, SGD for the table), > 0
    max_grad_norm: float = 1.0  # gradient clipping, > 0 (inf: none; the norm is logged either way)
    max_new_tokens: int = 8  # generation budget (Dr. GRPO's T_max)
    temperature: float = 1.0  # sampling temperature (log-probs use the same), > 0
    seed: int = 0  # prompt order and sampling seeds

    def __post_init__(self):
        loss = checks.choice("config.loss", self.loss, LOSSES)
        checks.choice("config.anchor", self.anchor, ("reference", "old"))
        checks.beta(self.beta, "config.beta")
        checks.real("config.clip_eps", self.clip_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        checks.real("config.kl_coef", self.kl_coef, low=0.0)
        checks.integer("config.k", self.k, low=2)
        for name in ("prompts_per_step", "steps", "updates_per_batch", "max_new_tokens"):
            checks.integer(f"config.{name}", getattr(self, name), low=1)
        checks.integer("config.seed", self.seed)
        checks.real("config.lr", self.lr, low=0.0, low_open=True)
        checks.real("config.max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, allow_inf=True)
        checks.real("config.temperature", self.temperature, low=0.0, low_open=True)
        defaults = {f.name: f.default for f in dataclasses.fields(RLConfig)}
        for name in _LOSS_OPTIONS:
            if name not in LOSSES[loss].options and getattr(self, name) != defaults[name]:
                raise ValueError(f"config.{name} is set to {getattr(self, name)!r} but loss {loss!r} does not use "
                                 f"it (it uses {', '.join(LOSSES[loss].options)})")


class TabularRun(NamedTuple):
    """The final log pi_theta [P, N] and log pi_theta after every step."""

    logp: Tensor
    history: list[Tensor]


def train_tabular(logp_ref: Tensor, reward: Tensor, config: RLConfig, sampling: str = "policy") -> TabularRun:
    r"""Train logits theta [P, N] (initialised at log pi_ref) on k sampled completions per prompt.

    1. sample k indices per prompt from ``sampling``: "policy" (on-policy pi_theta), "uniform",
       or "reference" (a stale snapshot: pi_ref, never refreshed);
    2. gather log pi_theta, log pi_ref and R at them: [P, k], each completion one "token";
    3. one SGD step (``config.lr``) on P times the configured loss (prompts have separate logits,
       so each prompt gets the step size of a lone group).

    Args:
        logp_ref: [P, N] log pi_ref; reward: [P, N] R(x, y).
        config: :class:`RLConfig` (its LM-only fields must stay at their defaults).
        sampling: where the k completions come from.

    Returns:
        :class:`TabularRun`.
    """
    checks.tensor("logp_ref", logp_ref, dims=2, floating=True)
    checks.tensor("reward", reward, dims=2, floating=True)
    checks.same_shape(logp_ref=logp_ref, reward=reward)
    checks.finite("logp_ref", logp_ref, allow_neg_inf=True)
    checks.finite("reward", reward)
    checks.choice("sampling", sampling, ("policy", "uniform", "reference"))
    if not isinstance(config, RLConfig):
        raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
    defaults = RLConfig()
    for name in ("prompts_per_step", "updates_per_batch", "max_grad_norm", "max_new_tokens", "temperature"):
        if getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"config.{name} does not apply to train_tabular (it takes one SGD step per batch)")
    theta = torch.nn.Parameter(logp_ref.detach().clone())  # [P, N]
    opt = torch.optim.SGD([theta], lr=config.lr)
    g = torch.Generator(device=logp_ref.device).manual_seed(config.seed)
    rows = torch.arange(logp_ref.shape[0], device=logp_ref.device).unsqueeze(1)  # [P, 1]
    history = []
    for _ in range(config.steps):
        logp_all = torch.log_softmax(theta, dim=-1)  # [P, N]
        probs = {"policy": logp_all, "uniform": torch.zeros_like(logp_ref), "reference": logp_ref}[sampling]
        idx = torch.multinomial(probs.detach().softmax(-1), config.k, replacement=True, generator=g)  # [P, k]
        tok = logp_all[rows, idx].unsqueeze(-1)  # [P, k] -> [P, k, 1]: one "token" per completion
        batch = GroupBatch(tok, tok.detach(), logp_ref[rows, idx].unsqueeze(-1), torch.ones_like(tok),
                           reward[rows, idx], max_tokens=1)
        value = LOSSES[config.loss].fn(batch, config)
        opt.zero_grad(set_to_none=True)
        (value * logp_ref.shape[0]).backward()
        opt.step()
        history.append(torch.log_softmax(theta.detach(), dim=-1))
    return TabularRun(history[-1], history)


@dataclass
class TrainLog:
    """Per-step metrics of :func:`train` (floats, one per step)."""

    reward: list[float]  # mean reward of the step's samples
    solved: list[float]  # share of groups with a nonzero reward
    kl_ref: list[float]  # k1 estimate mean_i log pi_old(y_i)/pi_ref(y_i) on the step's samples
    loss: list[float]  # the loss of the step's last update
    grad_norm: list[float]  # gradient norm before clipping, last update of the step
    length: list[float]  # mean completion length in tokens

    def as_dict(self) -> dict[str, list[float]]:
        """Namespaced keys, for loggers: ``reward/mean``, ``kl/ref``, ``grad/norm``, ..."""
        names = {"reward": "reward/mean", "solved": "reward/solved_frac", "kl_ref": "kl/ref", "loss": "loss",
                 "grad_norm": "grad/norm", "length": "len/mean"}
        return {names[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}


def train(policy, ref, tokenizer, prompts: Sequence[str], targets: Sequence, reward_fn: Callable,
          config: RLConfig = RLConfig(), progress: bool = False) -> TrainLog:
    r"""Train ``policy`` in place with the configured loss on sampled groups.

    Each step:
      1. draw ``prompts_per_step`` prompts and k completions each from the policy (``lm.sample``);
      2. score them: ``reward_fn(texts, targets) -> [P·k]`` rewards;
      3. per-token log-probs of ``ref`` (no grad);
      4. ``updates_per_batch`` times: policy log-probs with grad, the loss, AdamW step; the first
         update's log-probs, detached, are the old policy's (no extra forward).

    The policy stays in eval mode (dropout off), as usual for RL fine-tuning of LMs.

    Args:
        policy: causal LM to train (modified in place).
        ref: the frozen reference model pi_ref (same tokenizer); never updated.
        prompts, targets: the prompt pool and what ``reward_fn`` needs for each prompt.
        reward_fn: ``(texts, targets) -> Tensor [n]``.
        config: :class:`RLConfig`.
        progress: show a tqdm bar.

    Returns:
        :class:`TrainLog`.
    """
    from tqdm.auto import tqdm

    if not isinstance(config, RLConfig):
        raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
    prompts = checks.strings("prompts", prompts)
    if len(prompts) != len(targets):
        raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}")
    n_prompts = min(config.prompts_per_step, len(prompts))
    device = next(policy.parameters()).device
    policy.eval()  # dropout off for sampling and for the update alike
    opt = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(config.seed)
    logs: dict[str, list[Tensor]] = {f.name: [] for f in dataclasses.fields(TrainLog)}
    for step in tqdm(range(config.steps), disable=not progress, desc=config.loss):
        idx = torch.randperm(len(prompts), generator=g)[:n_prompts].tolist()
        s = lm.sample(policy, tokenizer, [prompts[i] for i in idx], k=config.k, max_new_tokens=config.max_new_tokens,
                      temperature=config.temperature, seed=config.seed * 1_000_003 + step)
        rewards = checks.rewards(reward_fn(s.texts, s.expand([targets[i] for i in idx])), len(s))
        rewards = s.by_prompt(rewards.to(device))  # [P*k] -> [P, k]
        args = (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, config.temperature)
        with torch.no_grad():
            ref_tok = s.by_prompt(lm._sequence_logprobs(ref, *args)[1])  # [P, k, T]
        mask = s.by_prompt(s.completion_mask.float())
        for update in range(config.updates_per_batch):
            logp_tok = s.by_prompt(lm._sequence_logprobs(policy, *args)[1])
            if update == 0:  # the policy has not moved yet: its log-probs are the old ones
                old_tok = logp_tok.detach()
            batch = GroupBatch(logp_tok, old_tok, ref_tok, mask, rewards, config.max_new_tokens)
            loss = LOSSES[config.loss].fn(batch, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            opt.step()
        logs["reward"].append(rewards.mean())
        logs["solved"].append((rewards.max(dim=1).values > 0).float().mean())
        logs["kl_ref"].append((old_tok - ref_tok).sum(-1).mean())
        logs["loss"].append(loss.detach())
        logs["grad_norm"].append(grad_norm.detach())
        logs["length"].append(mask.sum(-1).mean())
    return TrainLog(**{key: torch.stack(v).cpu().tolist() for key, v in logs.items()})  # one host sync, at the end
