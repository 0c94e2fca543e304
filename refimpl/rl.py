r"""Training a policy on groups of k completions per prompt: one loss table, one LM trainer.

Every loss of :data:`LOSSES` takes a :class:`GroupBatch` and an :class:`RLConfig` and returns a
scalar: GVPO (:mod:`refimpl.gvpo`), GRPO and Dr. GRPO (:mod:`refimpl.grpo`). The same table
serves :func:`refimpl.tabular.train_tabular` (a table of logits over a finite support, the exact
world) and :func:`train` (a causal LM on sampled completions). KL-regularised policy gradient
(:mod:`refimpl.klpg`; sequence-level by default, RLOO baseline) is the entry "kl_pg"; per-token
penalties (``kl_level="token"``, the estimators of :mod:`refimpl.klest`) are what TRL's
GRPOTrainer and verl code. KL-PG with k1 in the reward and the RLOO baseline has beta⁻¹ times GVPO-reference's
gradient on any batch, from any sampler, so like GVPO it runs off-policy (stale, replayed or
re-used data) with pi* as its fixed point; without a baseline it does not
(:func:`refimpl.klpg.expected_gradient`). A config option that the chosen loss does not use must
stay at its default: setting it is an error, never silently ignored.

:func:`train` follows the authors' GVPO code (a verl fork): each step generates one rollout of
``prompts_per_step`` prompts × k completions, then makes ``epochs`` passes over it in
``minibatches`` sequential updates. The "old" anchor is the policy at the start of the step, so
from the second update on rho ≠ 0 (with a single update per rollout rho ≡ 0 and GVPO-old is
centred-reward policy gradient). GRPO's ratio is taken to the policy that *generated* the
samples, so its clipping acts from the second update on, and on stale data. Off-policy variants:
``staleness`` trains on the rollout generated that many steps earlier; ``replay`` adds that many
earlier rollouts to each step's data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import checks, klest, klpg, lm
from .losses import _LOSS_OPTIONS, LOSSES, GroupBatch, Loss  # noqa: F401 (re-exported)

__all__ = ["RLConfig", "TrainLog", "train", "rollout_batch"]  # GroupBatch, LOSSES: refimpl.losses (re-exported)


@dataclass(frozen=True)
class RLConfig:
    """One training run (:func:`train`; :func:`refimpl.tabular.train_tabular` uses the loss block
    and ``k``, ``steps``, ``lr``, ``seed``)."""

    loss: str = "gvpo"  # a key of LOSSES
    anchor: str = "reference"  # GVPO's pi_anchor: "reference" (fixed pi_ref) or "old" (policy at step start)
    beta: float = 0.1  # KL coefficient of GVPO and KL-PG, > 0
    gvpo_terms: str = "both"  # GVPO ablations: "both", or only the "covariance" or the "variance" term
    gvpo_reduction: str = "mean"  # GVPO over groups: "mean" (this book) or "sum" (the authors' code)
    gvpo_rho: str = "sum"  # GVPO's log-ratio over a completion's tokens: "sum" (the authors') or "token_mean"
    clip_eps: float = 0.2  # GRPO / Dr. GRPO clip range, in (0, 1)
    kl_coef: float = 0.0  # GRPO's k3 penalty weight, >= 0
    kl_estimator: str = "k1_reward"  # KL-PG: how the penalty is coded, one of refimpl.klest.ESTIMATORS
    kl_baseline: str = "rloo"  # KL-PG: "rloo" (leave-one-out) or "none"
    kl_level: str = "sequence"  # KL-PG: penalty on the sequence log-ratio, or summed over per-"token" ones
    k: int = 4  # completions per prompt (group size), >= 2
    prompts_per_step: int = 16  # prompts per rollout, drawn without replacement
    steps: int = 40  # rollouts (each followed by its updates)
    minibatches: int = 1  # sequential updates per pass over a rollout (its groups split evenly)
    epochs: int = 1  # passes over each rollout
    staleness: int = 0  # train on the rollout generated this many steps earlier (off-policy)
    replay: int = 0  # also train on this many earlier rollouts (a replay buffer)
    lr: float = 1e-4  # learning rate (AdamW for the LM, SGD for the table), > 0
    max_grad_norm: float = 1.0  # gradient clipping, > 0 (inf: none; the norm is logged either way)
    max_new_tokens: int = 16  # generation budget (Dr. GRPO's T_max)
    temperature: float = 1.0  # sampling temperature (log-probs use the same), > 0
    seed: int = 0  # prompt order and sampling seeds

    def __post_init__(self):
        loss = checks.choice("config.loss", self.loss, LOSSES)
        checks.choice("config.anchor", self.anchor, ("reference", "old"))
        checks.choice("config.gvpo_terms", self.gvpo_terms, ("both", "covariance", "variance"))
        checks.choice("config.gvpo_reduction", self.gvpo_reduction, ("mean", "sum"))
        checks.choice("config.gvpo_rho", self.gvpo_rho, ("sum", "token_mean"))
        checks.choice("config.kl_estimator", self.kl_estimator, klest.ESTIMATORS)
        checks.choice("config.kl_level", self.kl_level, klest.LEVELS)
        checks.choice("config.kl_baseline", self.kl_baseline, klpg.BASELINES)
        checks.beta(self.beta, "config.beta")
        checks.real("config.clip_eps", self.clip_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        checks.real("config.kl_coef", self.kl_coef, low=0.0)
        checks.integer("config.k", self.k, low=2)
        for name in ("prompts_per_step", "steps", "minibatches", "epochs", "max_new_tokens"):
            checks.integer(f"config.{name}", getattr(self, name), low=1)
        for name in ("staleness", "replay", "seed"):
            checks.integer(f"config.{name}", getattr(self, name), low=0)
        checks.real("config.lr", self.lr, low=0.0, low_open=True)
        checks.real("config.max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, allow_inf=True)
        checks.real("config.temperature", self.temperature, low=0.0, low_open=True)
        if self.prompts_per_step % self.minibatches:
            raise ValueError(f"config.minibatches={self.minibatches} must divide config.prompts_per_step="
                             f"{self.prompts_per_step} (whole groups per update)")
        defaults = {f.name: f.default for f in dataclasses.fields(RLConfig)}
        for name in _LOSS_OPTIONS:
            if name not in LOSSES[loss].options and getattr(self, name) != defaults[name]:
                raise ValueError(f"config.{name} is set to {getattr(self, name)!r} but loss {loss!r} does not use "
                                 f"it (it uses {', '.join(LOSSES[loss].options)})")


@dataclass
class TrainLog:
    """Per-step metrics of :func:`train` (floats, one per step)."""

    reward: list[float]  # mean reward of the step's fresh rollout
    solved: list[float]  # share of its groups with a nonzero reward
    kl_ref: list[float]  # k1 estimate mean_i log pi(y_i)/pi_ref(y_i) on the fresh rollout (policy before the step)
    loss: list[float]  # the loss of the step's last update
    grad_norm: list[float]  # gradient norm before clipping, mean over the step's updates
    clip_frac: list[float]  # share of real tokens whose GRPO ratio left [1-eps, 1+eps] (last update)
    length: list[float]  # mean completion length in tokens

    def as_dict(self) -> dict[str, list[float]]:
        """Namespaced keys, for loggers: ``reward/mean``, ``kl/ref``, ``grad/norm``, ..."""
        names = {"reward": "reward/mean", "solved": "reward/solved_frac", "kl_ref": "kl/ref", "loss": "loss",
                 "grad_norm": "grad/norm", "clip_frac": "clip/frac", "length": "len/mean"}
        return {names[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class _Rollout:
    s: lm.Samples  # P*k rows
    rewards: Tensor  # [P, k]
    behavior_tok: Tensor | None  # [P, k, T] log-probs of the generating policy (None: filled by the update)
    ref_tok: Tensor  # [P, k, T]


def _rollout(policy, ref, tokenizer, prompts, targets, reward_fn, c: RLConfig, idx, seed,
             behavior: bool = True) -> _Rollout:
    s = lm.sample(policy, tokenizer, [prompts[i] for i in idx], k=c.k, max_new_tokens=c.max_new_tokens,
                  temperature=c.temperature, seed=seed)
    rewards = checks.rewards(reward_fn(s.texts, s.expand([targets[i] for i in idx])), len(s))
    args = (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, c.temperature)
    with torch.no_grad():
        ref_tok = s.by_prompt(lm._sequence_logprobs(ref, *args)[1])  # [P, k, T]
        beh = s.by_prompt(lm._sequence_logprobs(policy, *args)[1]) if behavior else None
    return _Rollout(s, s.by_prompt(rewards.to(s.completion_ids.device)), beh, ref_tok)


def _check_run(policy, ref, prompts, targets, reward_fn, config) -> list[str]:
    """The checks :func:`train` and :func:`rollout_batch` share; returns ``prompts`` as a list."""
    checks.instance("config", config, RLConfig)
    for name, m in (("policy", policy), ("ref", ref)):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"{name} must be a causal LM (a torch.nn.Module), got {type(m).__name__}")
    if policy is ref:
        raise ValueError("ref must be a separate model from policy (the anchor would move with the policy): "
                         "pass a copy, e.g. copy.deepcopy(policy)")
    prompts = checks.strings("prompts", prompts)
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__len__") or len(prompts) != len(targets):
        raise ValueError(f"targets must have one entry per prompt ({len(prompts)}), got "
                         f"{len(targets) if hasattr(targets, '__len__') else type(targets).__name__}")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable (texts, targets) -> rewards, got {type(reward_fn).__name__}")
    if config.prompts_per_step > len(prompts):
        raise ValueError(f"config.prompts_per_step={config.prompts_per_step} exceeds the {len(prompts)} prompts")
    checks.same_device(policy=lm._device(policy), ref=lm._device(ref))
    return prompts


def rollout_batch(policy, ref, tokenizer, prompts: Sequence[str], targets: Sequence, reward_fn: Callable,
                  config: RLConfig = RLConfig(), seed: int = 0) -> GroupBatch:
    r"""One fresh rollout of :func:`train` (``config.prompts_per_step`` prompts drawn with ``seed``,
    k completions each) as the :class:`GroupBatch` of its first update: ``logp_tok`` carries the
    graph of ``policy``, and the behaviour and start log-probs are the policy's own (no grad).

    For measuring what each loss of :data:`LOSSES` does with the same samples (gradients, their
    variance); :func:`train` does not call it.

    Args:
        policy, ref: the policy (gradients flow into it) and the reference model (a separate
            object, in eval mode).
        prompts, targets, reward_fn: as in :func:`train`.
        config: :class:`RLConfig`; its ``k``, ``prompts_per_step``, ``max_new_tokens`` and
            ``temperature`` are used.
        seed: chooses the prompts and seeds the sampling, >= 0.

    Returns:
        :class:`GroupBatch` [P, k, T] with P = ``config.prompts_per_step``.
    """
    prompts = _check_run(policy, ref, prompts, targets, reward_fn, config)
    if ref.training:
        raise ValueError("ref is in train mode (dropout would add noise to log pi_ref): call ref.eval() first")
    seed = checks.integer("seed", seed, low=0)
    idx = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[: config.prompts_per_step]
    r = _rollout(policy, ref, tokenizer, prompts, targets, reward_fn, config, idx.tolist(), seed)
    args = (r.s.prompt_ids, r.s.prompt_mask, r.s.completion_ids, r.s.completion_mask, config.temperature)
    logp = r.s.by_prompt(lm._sequence_logprobs(policy, *args)[1])  # [P, k, T] with the graph
    mask = r.s.by_prompt(r.s.completion_mask.float())
    return GroupBatch(logp, r.behavior_tok, r.behavior_tok, r.ref_tok, mask, r.rewards, config.max_new_tokens)


def train(policy, ref, tokenizer, prompts: Sequence[str], targets: Sequence, reward_fn: Callable,
          config: RLConfig = RLConfig(), progress: bool = False,
          callback: Callable[[int, torch.nn.Module], None] | None = None) -> TrainLog:
    r"""Train ``policy`` in place with the configured loss on sampled groups.

    Each step:
      1. generate a rollout: ``prompts_per_step`` prompts, k completions each, from the current
         policy (``lm.sample``), their rewards (``reward_fn(texts, targets) -> [P·k]``), and the
         per-token log-probs of ``ref`` and of the generating policy (no grad; when the rollout
         feeds a single update, the generating policy's come from that update's forward pass);
      2. pick the data: the rollout of ``staleness`` steps ago plus ``replay`` earlier ones (none
         yet: no update this step);
      3. the anchor log-probs of the current policy at the start of the updates (no grad);
      4. ``epochs`` × ``minibatches`` sequential AdamW updates, each on a shuffled equal share of
         the groups, with gradient clipping.

    The policy stays in eval mode (dropout off), as usual for RL fine-tuning of LMs; ``ref`` (a
    separate object: passing the policy itself raises) is put in eval mode too.
    ``config.staleness`` must be below ``config.steps`` (else no update would happen).
    ``callback(steps_done, policy)``, when given, runs after every step (to evaluate checkpoints);
    it must leave the policy's parameters alone and the policy in eval mode.

    Returns:
        :class:`TrainLog`.
    """
    from tqdm.auto import tqdm

    prompts, c = _check_run(policy, ref, prompts, targets, reward_fn, config), config
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    progress = checks.boolean("progress", progress)
    if c.staleness >= c.steps:
        raise ValueError(f"config.staleness={c.staleness} must be < config.steps={c.steps}: the first update uses the "
                         "rollout of step staleness + 1, so no update would ever happen")
    policy.eval()  # dropout off for sampling and for the update alike
    ref.eval()  # the reference is not trained: no dropout noise in log pi_ref
    opt = torch.optim.AdamW(policy.parameters(), lr=c.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(c.seed)
    buffer: list[_Rollout] = []
    # Data used once, by one update, right after generation: the policy that generated it is the one being
    # updated, so its log-probs come from the update's own forward pass instead of a separate one.
    reused = c.minibatches > 1 or c.epochs > 1 or c.staleness > 0 or c.replay > 0
    logs: dict[str, list] = {f.name: [] for f in dataclasses.fields(TrainLog)}
    zero = torch.zeros((), device=next(policy.parameters()).device)  # a step without an update logs 0
    for step in tqdm(range(c.steps), disable=not progress, desc=c.loss):
        idx = torch.randperm(len(prompts), generator=g)[: c.prompts_per_step].tolist()
        fresh = _rollout(policy, ref, tokenizer, prompts, targets, reward_fn, c, idx, c.seed * 1_000_003 + step,
                         behavior=reused)
        buffer = (buffer + [fresh])[-(c.staleness + c.replay + 1):]
        data = buffer[: len(buffer) - c.staleness][-(c.replay + 1):] if len(buffer) > c.staleness else []
        loss, norms, clip = zero, [], zero
        starts = []  # the anchor "old": the policy as this step's updates begin (no grad)
        for r in data:
            args = (r.s.prompt_ids, r.s.prompt_mask, r.s.completion_ids, r.s.completion_mask, c.temperature)
            with torch.no_grad():
                starts.append(r.behavior_tok if r is fresh else r.s.by_prompt(lm._sequence_logprobs(policy, *args)[1]))
        for r, start in zip(data, starts):
            mask = r.s.by_prompt(r.s.completion_mask.float())
            P, dev = r.rewards.shape[0], mask.device
            # every update's groups for this rollout, drawn on the CPU and moved once (one copy, not one per update)
            orders = torch.stack([torch.randperm(P, generator=g) for _ in range(c.epochs)]).to(dev)  # [epochs, P]
            for order in orders:
                for gi in order.chunk(c.minibatches):  # [m] groups of this update
                    rows = (gi[:, None] * c.k + torch.arange(c.k, device=dev)).reshape(-1)  # [m*k]
                    logp = lm._sequence_logprobs(policy, r.s.prompt_ids[rows], r.s.prompt_mask[rows],
                                                 r.s.completion_ids[rows], r.s.completion_mask[rows], c.temperature)[1]
                    logp = logp.reshape(len(gi), c.k, -1)  # [m, k, T]
                    if r.behavior_tok is None:  # not reused: the current policy generated it (all groups, once)
                        r.behavior_tok = torch.empty_like(logp)
                        r.behavior_tok[gi] = logp.detach()
                        start = r.behavior_tok
                    batch = GroupBatch(logp, r.behavior_tok[gi], start[gi], r.ref_tok[gi], mask[gi], r.rewards[gi],
                                       c.max_new_tokens)
                    loss = LOSSES[c.loss].fn(batch, c)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), c.max_grad_norm).detach())
                    opt.step()
                    ratio = torch.exp(logp.detach() - batch.behavior_tok)
                    clip = ((ratio - 1).abs() > c.clip_eps).float().mul(batch.mask).sum() / batch.mask.sum()
        # logged on the device and read back once, after the last step: no host sync per step
        fm = fresh.s.by_prompt(fresh.s.completion_mask.float())
        logs["reward"].append(fresh.rewards.mean())
        logs["solved"].append((fresh.rewards.max(dim=1).values > 0).float().mean())
        logs["kl_ref"].append((fresh.behavior_tok - fresh.ref_tok).sum(-1).mean())
        logs["loss"].append(loss.detach())
        logs["grad_norm"].append(torch.stack(norms).mean() if norms else zero)
        logs["clip_frac"].append(clip.detach())
        logs["length"].append(fm.sum(-1).mean())
        if callback is not None:
            callback(step + 1, policy)
    return TrainLog(**{key: torch.stack([v.float() for v in vals]).cpu().tolist() for key, vals in logs.items()})
