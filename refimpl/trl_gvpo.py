r"""GVPO on TRL: a ``GRPOTrainer`` subclass whose loss is :func:`refimpl.gvpo.gvpo_loss`.

For users who outgrow one GPU: TRL's trainer brings accelerate (DDP, DeepSpeed ZeRO, FSDP) and vLLM
generation; this subclass changes only what GVPO (Zhang et al. 2025) needs:

1. rewards are centred within each group and **not** divided by their std (``scale_rewards="none"``);
2. TRL's own KL term is off (``beta=0.0``); GVPO's ``gvpo_beta`` enters through the loss;
3. the anchor log-probs log pi_anchor(y_i), summed over completion tokens, are computed once per
   generation batch, from the policy at the start of the step (``gvpo_anchor="old"``, the
   authors' code) or from a frozen reference model (``gvpo_anchor="reference"``);
4. each group of ``num_generations`` completions stays together in one micro-batch (groups are
   shuffled, never split), so the loss sees whole groups;
5. the loss is ``gvpo_loss(logp, logp_anchor, rewards, gvpo_beta)`` on ``[groups, k]`` tensors.

Requires ``trl`` (``pip install -e ".[trl]"``); importing this module without it raises ImportError.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from . import checks
from .gvpo import gvpo_loss

__all__ = ["GVPOTrainerConfig", "GVPOTrainer"]


@dataclass
class GVPOTrainerConfig(GRPOConfig):
    """``GRPOConfig`` plus GVPO's two settings; TRL's reward scaling and KL term are forced off."""

    gvpo_beta: float = field(default=0.1, metadata={"help": "GVPO's KL coefficient beta (> 0)."})
    gvpo_anchor: str = field(default="old", metadata={"help": "'old' (policy at the start of the step) or 'reference'."})

    def __post_init__(self):
        if self.scale_rewards not in ("none", False):
            # GVPO's weights use raw centred rewards; TRL's default divides by the group std.
            self.scale_rewards = "none"
        self.beta = 0.0  # TRL's own k3 KL penalty and reference model stay off
        super().__post_init__()
        self.gvpo_beta = checks.beta(self.gvpo_beta, "gvpo_beta")
        if self.gvpo_anchor not in ("old", "reference"):
            raise ValueError(f"gvpo_anchor must be 'old' or 'reference', got {self.gvpo_anchor!r}")
        if self.per_device_train_batch_size % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}) so that every micro-batch holds whole groups"
            )


class GVPOTrainer(GRPOTrainer):
    """TRL's GRPO trainer with GVPO's loss; see the module docstring for what changes.

    Every argument is ``trl.GRPOTrainer``'s, with ``args`` a :class:`GVPOTrainerConfig`, plus:

    Args:
        ref_model: the frozen reference for ``gvpo_anchor="reference"`` (default: a copy of the
            initial policy). Ignored for ``gvpo_anchor="old"``.
    """

    def __init__(self, *args, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, GVPOTrainerConfig):
            raise TypeError(f"args must be a GVPOTrainerConfig, got {type(self.args).__name__}")
        self.gvpo_ref_model = None
        if self.args.gvpo_anchor == "reference":
            ref = ref_model if ref_model is not None else copy.deepcopy(self.accelerator.unwrap_model(self.model))
            ref.eval().requires_grad_(False)
            self.gvpo_ref_model = self.accelerator.prepare_model(ref, evaluation_mode=True)

    def _sequence_logps(self, model, inputs) -> torch.Tensor:
        """[B] log pi(y|x) summed over completion tokens (TRL's per-token log-probs, masked)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        per_token, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1))
        return (per_token * inputs["completion_mask"]).sum(dim=1)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        anchor = self.gvpo_ref_model if self.args.gvpo_anchor == "reference" else self.model
        with torch.no_grad():
            out["gvpo_logp_anchor"] = self._sequence_logps(anchor, out)  # [B], fixed for this batch
        return out

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering, but shuffling whole groups so that no micro-batch splits one."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        k, n_chunks = self.num_generations, self.args.steps_per_generation
        if self._step % (n_chunks * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            B = batch["completion_ids"].shape[0]
            groups = torch.randperm(B // k).repeat_interleave(k) * k + torch.arange(B).remainder(k)  # [B]
            size = B // n_chunks
            self._buffered_inputs = [
                {key: (v[groups[c * size:(c + 1) * size].to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0
                       and v.shape[0] == B else v) for key, v in batch.items()}
                for c in range(n_chunks)
            ]
        return self._buffered_inputs[self._step % n_chunks]

    def _compute_loss(self, model, inputs):
        k = self.num_generations
        logp = self._sequence_logps(model, inputs).view(-1, k)  # [groups, k]
        logp_anchor = inputs["gvpo_logp_anchor"].view(-1, k)
        rewards = inputs["advantages"].view(-1, k)  # R - mean R; gvpo_loss centres again (a no-op)
        loss = gvpo_loss(logp, logp_anchor, rewards, self.args.gvpo_beta)
        mode = "train" if model.training else "eval"
        rho = (logp.detach() - logp_anchor)
        self._metrics[mode]["gvpo/rho_mean"].append(self.accelerator.gather(rho.mean()).mean().item())
        return loss
