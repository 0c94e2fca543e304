r"""GVPO on TRL: a ``GRPOTrainer`` subclass whose loss is :func:`refimpl.gvpo.gvpo_loss`.

For users who outgrow one GPU: TRL's trainer brings accelerate (DDP, DeepSpeed ZeRO, FSDP) and vLLM
generation; this subclass changes only what GVPO (Zhang et al. 2025) needs. Per micro-batch of
whole groups of k = ``num_generations`` completions, with log pi(y_i) summed over the completion
tokens that the model wrote (``completion_mask`` times TRL's ``tool_mask``, which zeroes tool and
environment output, exactly as TRL's own loss masks it):

    L = 1/(k-1) · ½ · sum_i [beta (rho_i - mean rho) - (R_i - mean R)]^2,  rho = log pi_theta - log pi_anchor

averaged over the micro-batch's groups (``gvpo_reduction="mean"``, as :func:`gvpo_loss`) or summed
(``"sum"``, the authors' code: (micro-batch size / k) × the mean), then divided by the number of
micro-batches accumulated into the optimizer step, as TRL's losses are, so that with "mean" an
update does not depend on how the batch is split (the authors' "sum" does, by design).

* Rewards are centred within each group and not divided by their std, TRL's KL term is off, and
  nothing else of TRL's loss applies: :class:`GVPOTrainerConfig` defaults to these settings and
  raises ``ValueError`` for any conflicting one (``beta``, ``scale_rewards``,
  ``multi_objective_aggregation``, ``num_generations_eval``, ``loss_type``, clipping, entropy or
  importance-sampling options) rather than ignoring it.
* Groups stay whole: the generation batch is shuffled by groups, never split.
* Anchor ``gvpo_anchor="old"`` (the authors' code) is the policy that generated the batch. When the
  batch is reused across optimizer steps, TRL already computes its log-probs
  (``old_per_token_logps``) and they are reused; otherwise no update happened since generation
  and the anchor is the current policy, detached (rho = 0: centred-reward policy gradient).
  ``gvpo_anchor="reference"``: a frozen model, prepared like TRL's ``ref_model`` (loaded from the
  policy's checkpoint unless ``ref_model`` is given, then ZeRO-3-sharded by ``prepare_deepspeed``,
  FSDP-wrapped by ``prepare_fsdp``, or put on the device); a PEFT policy with its adapters disabled
  needs no copy. Its log-probs are computed once per generation batch, in chunks of
  ``per_device_train_batch_size`` like TRL's old-log-prob pass.

**The authors' regime** (policy at the start of the rollout as anchor, several sequential
mini-batch updates per rollout: 1024 prompts × k=4 per rollout, mini-batches of 256 prompts, beta
0.1, lr 1e-6, grad clip 1.0): ``gvpo_anchor="old"`` with ``steps_per_generation = 4 ×
gradient_accumulation_steps`` (four optimizer steps per rollout), e.g. on 8 GPUs
``per_device_train_batch_size=16, gradient_accumulation_steps=8, steps_per_generation=32,
num_generations=4, gvpo_reduction="sum", max_grad_norm=1.0``; or ``num_iterations > 1`` (epochs
over the rollout). A multi-GPU launch (``train.py`` builds ``GVPOTrainerConfig`` and ``GVPOTrainer``
and calls ``train()``)::

    accelerate launch --num_processes 8 --config_file zero3.yaml train.py
    # zero3.yaml: distributed_type: DEEPSPEED
    #             deepspeed_config: {zero_stage: 3, zero3_init_flag: true}
    # or FSDP:    distributed_type: FSDP
    #             fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP}

The subclass overrides private ``GRPOTrainer`` methods; it is tested with ``trl`` 1.16 (the pin in
the ``trl`` extra) and raises ``RuntimeError`` naming the installed version when one of them is
missing or has changed its signature. Requires ``trl`` (``pip install -e ".[trl]"``).
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
import trl
from packaging.specifiers import SpecifierSet
from trl import GRPOConfig, GRPOTrainer

from . import checks
from .gvpo import _gvpo_loss

__all__ = ["GVPOTrainerConfig", "GVPOTrainer", "check_trl_api", "TESTED_TRL"]

TESTED_TRL = ">=1.16,<1.17"
# GRPOTrainer's private methods this module overrides or calls, with their leading parameters
_PRIVATE_METHODS = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss"),
    "_prepare_inputs": ("self", "generation_batch"),
    "_compute_loss": ("self", "model", "inputs"),
}
# instance attributes GRPOTrainer.__init__ sets and this module reads or writes
_PRIVATE_ATTRS = ("_step", "_buffered_inputs", "_metrics", "num_generations", "num_iterations", "temperature",
                  "aux_loss_enabled", "router_aux_loss_coef")
# multimodal inputs TRL's forward passes take from the batch
_MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _trl_error(what: str) -> RuntimeError:
    return RuntimeError(f"refimpl.trl_gvpo relies on private GRPOTrainer internals of trl{TESTED_TRL}, but the "
                        f"installed trl {trl.__version__} {what}; install a tested one: pip install 'trl{TESTED_TRL}'")


def check_trl_api(trainer=None) -> None:
    """Raise ``RuntimeError`` (naming the installed TRL) if a private TRL API this module uses is gone.

    Checks that each overridden or called ``GRPOTrainer`` method exists with its 1.16 leading
    parameters, that TRL's loss is flagged as already scaled for gradient accumulation, and, given a
    constructed ``trainer``, the private attributes read here. Runs at import and in ``GVPOTrainer``.
    """
    for name, params in _PRIVATE_METHODS.items():
        method = getattr(GRPOTrainer, name, None)
        if not callable(method):
            raise _trl_error(f"has no GRPOTrainer.{name}")
        got = tuple(inspect.signature(method).parameters)
        if got[:len(params)] != params or (name == "_get_per_token_logps_and_entropies" and set(_MM_KEYS) - set(got)):
            raise _trl_error(f"changed GRPOTrainer.{name}: expected parameters {params}, found {got}")
    if getattr(GRPOTrainer, "loss_is_scaled_for_ga", None) is not True:
        raise _trl_error("no longer sets GRPOTrainer.loss_is_scaled_for_ga = True (the loss scaling used here)")
    missing = [a for a in _PRIVATE_ATTRS if trainer is not None and not hasattr(trainer, a)]
    if missing:
        raise _trl_error(f"no longer sets the GRPOTrainer attributes {missing}")


check_trl_api()
if not SpecifierSet(TESTED_TRL).contains(trl.__version__):
    warnings.warn(f"refimpl.trl_gvpo is tested with trl{TESTED_TRL}, not the installed {trl.__version__}", stacklevel=2)
try:
    from accelerate.utils import is_peft_model
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import (add_fused_lm_head, create_model_from_path, disable_dropout_in_model,
                                   get_config_model_id, split_pixel_values_by_grid, split_tensor_dict,
                                   unsplit_pixel_values_by_grid, use_adapter)
except ImportError as err:  # a moved helper
    raise _trl_error(f"lacks a helper: {err}") from err

# GRPOConfig fields whose only effect is on TRL's own loss, which GVPO replaces: they must keep their defaults
_LOSS_ONLY_FIELDS = ("loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level",
                     "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "off_policy_mask_threshold",
                     "vllm_importance_sampling_correction")


@dataclass
class GVPOTrainerConfig(GRPOConfig):
    """``GRPOConfig`` plus GVPO's settings; its defaults switch TRL's reward scaling, KL and IS off."""

    gvpo_beta: float = field(default=0.1, metadata={"help": "GVPO's KL coefficient beta (> 0)."})
    gvpo_anchor: str = field(default="old", metadata={
        "help": "'old' (the policy that generated the batch, the authors' code) or 'reference' (a frozen model)."})
    gvpo_reduction: str = field(default="mean", metadata={
        "help": "'mean' over the micro-batch's groups (refimpl.gvpo.gvpo_loss) or 'sum' (the authors' code)."})
    # TRL fields with GVPO's values as defaults; any other value raises
    beta: float = field(default=0.0, metadata={"help": "TRL's KL term: must stay 0.0 (GVPO uses gvpo_beta)."})
    scale_rewards: str = field(default="none", metadata={"help": "Must be 'none' (or False): GVPO centres only."})
    vllm_importance_sampling_correction: bool = field(default=False, metadata={
        "help": "Must stay False: GVPO's loss has no importance ratio (any sampling distribution is allowed)."})

    def __post_init__(self):
        super().__post_init__()  # maps scale_rewards True/False to "group"/"none"
        self.gvpo_beta = checks.beta(self.gvpo_beta, "gvpo_beta")
        checks.choice("gvpo_anchor", self.gvpo_anchor, ("old", "reference"))
        checks.choice("gvpo_reduction", self.gvpo_reduction, ("mean", "sum"))
        if self.beta != 0.0:
            raise ValueError(f"beta must be 0.0 (TRL's KL penalty; GVPO's KL coefficient is gvpo_beta), "
                             f"got {self.beta}")
        if self.scale_rewards != "none":
            raise ValueError(f"scale_rewards must be 'none' or False (GVPO's rewards are centred, not divided by "
                             f"their std), got {self.scale_rewards!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("multi_objective_aggregation must be 'sum_then_normalize' (with scale_rewards='none': "
                             f"weighted sum, then group centring), got {self.multi_objective_aggregation!r}")
        if self.num_generations_eval not in (None, self.num_generations):
            raise ValueError(f"num_generations_eval must be None or num_generations ({self.num_generations}): "
                             f"GVPO's loss is defined per group of k, got {self.num_generations_eval}")
        defaults = {f.name: f.default for f in fields(self)}
        for name in _LOSS_ONLY_FIELDS:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"{name} only changes TRL's own loss, which GVPO replaces: leave it at "
                                 f"{defaults[name]!r}, got {getattr(self, name)!r}")
        sizes = {"per_device_train_batch_size": self.per_device_train_batch_size}
        if self.eval_strategy != "no" or self.do_eval:
            sizes["per_device_eval_batch_size"] = self.per_device_eval_batch_size
        for name, size in sizes.items():
            if size % self.num_generations != 0:
                raise ValueError(f"{name} ({size}) must be a multiple of num_generations ({self.num_generations}) "
                                 "so that every micro-batch holds whole groups")


def _permute(value, perm: torch.Tensor):
    """``value`` reordered along dim 0 by ``perm`` (as TRL's ``shuffle_sequence_dict``)."""
    if value is None or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return value
    if isinstance(value, torch.Tensor):
        return value[perm.to(value.device)]
    return [value[i] for i in perm.tolist()]


class GVPOTrainer(GRPOTrainer):
    """TRL's GRPO trainer with GVPO's loss; see the module docstring for what changes.

    Every argument is ``trl.GRPOTrainer``'s, with ``args`` a :class:`GVPOTrainerConfig`, plus:

    Args:
        ref_model: the frozen reference for ``gvpo_anchor="reference"``: a model or a checkpoint path
            (default: the policy's checkpoint, ``model.config._name_or_path``, as TRL loads its own
            reference; for a PEFT policy, the policy with its adapters disabled). Only with
            ``gvpo_anchor="reference"``.
    """

    def __init__(self, *args, ref_model=None, **kwargs):
        check_trl_api()
        super().__init__(*args, **kwargs)
        check_trl_api(self)
        if not isinstance(self.args, GVPOTrainerConfig):
            raise TypeError(f"args must be a GVPOTrainerConfig, got {type(self.args).__name__}")
        if ref_model is not None and self.args.gvpo_anchor != "reference":
            raise ValueError(f"ref_model is used only with gvpo_anchor='reference', got {self.args.gvpo_anchor!r}")
        self.gvpo_ref_model = None  # None with the "reference" anchor: a PEFT policy with its adapters off
        if self.args.gvpo_anchor == "reference" and not (ref_model is None and is_peft_model(self.model)):
            self.gvpo_ref_model = self._prepare_gvpo_reference(ref_model)

    def _prepare_gvpo_reference(self, ref_model):
        """The frozen reference, built and wrapped like GRPOTrainer's ``ref_model`` (sharded under ZeRO-3/FSDP)."""
        if ref_model is None or isinstance(ref_model, str):
            path = ref_model or get_config_model_id(self.model.config)
            if not path:
                raise ValueError("ref_model: the policy has no checkpoint path (config._name_or_path) to load the "
                                 "reference from; pass ref_model= (a model or a path)")
            kwargs = dict(self.args.model_init_kwargs or {})
            if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kwargs["device_map"] = None  # as TRL: "auto" fails under distributed training
            kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            kwargs.setdefault("dtype", self.model.dtype)
            kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
            ref_model = create_model_from_path(path, **kwargs)
        elif not isinstance(ref_model, torch.nn.Module):
            raise TypeError(f"ref_model must be a model, a path or None, got {type(ref_model).__name__}")
        ref_model.eval().requires_grad_(False)
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    @staticmethod
    def _gvpo_mask(inputs) -> torch.Tensor:
        """[B, T] tokens the model wrote: ``completion_mask`` times TRL's ``tool_mask`` (0 on tool output)."""
        mask = inputs["completion_mask"]
        return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]

    def _gvpo_logps(self, model, inputs, batch_size=None, compute_aux_loss=False):
        """([B] log pi(y|x) summed over the masked completion tokens, MoE aux loss or None)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        per_token, _, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1), batch_size=batch_size,
            compute_aux_loss=compute_aux_loss, **{key: inputs.get(key) for key in _MM_KEYS})  # [B, T]
        return (per_token * self._gvpo_mask(inputs)).sum(dim=1), aux_loss

    def _generate_and_score_completions(self, inputs):
        """TRL's batch plus ``gvpo_logp_anchor`` [B] where the anchor is not the current policy."""
        out = super()._generate_and_score_completions(inputs)
        if self.args.gvpo_anchor == "reference":
            training = self.model.training
            batch_size = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
            ref, context = self.gvpo_ref_model, nullcontext()
            if ref is None:  # a PEFT policy with its adapters off (or its "ref" adapter), as TRL does
                unwrapped = self.accelerator.unwrap_model(self.model)
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            with torch.no_grad(), context:
                out["gvpo_logp_anchor"], _ = self._gvpo_logps(self.model if ref is None else ref, out, batch_size)
        elif out.get("old_per_token_logps") is not None:  # TRL's pass over the generating policy, reused
            out["gvpo_logp_anchor"] = (out["old_per_token_logps"] * self._gvpo_mask(out)).sum(dim=1)
        return out

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering, but shuffling whole groups so that no micro-batch splits one."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        k, n_chunks = self.num_generations, self.args.steps_per_generation
        if self._step % (n_chunks * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            B = batch["completion_ids"].shape[0]
            perm = torch.randperm(B // k).repeat_interleave(k) * k + torch.arange(B) % k  # [B], groups kept whole
            batch = {key: _permute(value, perm) for key, value in batch.items()}
            self._buffered_inputs = [unsplit_pixel_values_by_grid(c) for c in split_tensor_dict(batch, n_chunks)]
        return self._buffered_inputs[self._step % n_chunks]

    def _compute_loss(self, model, inputs):
        """L / (micro-batches accumulated), L = mean (or sum) over groups of :func:`gvpo_loss`'s per-group term."""
        k, training = self.num_generations, self.model.training
        logp, aux_loss = self._gvpo_logps(model, inputs, compute_aux_loss=self.aux_loss_enabled)
        logp = logp.view(-1, k)  # [groups, k]
        anchor = inputs.get("gvpo_logp_anchor")
        logp_anchor = logp.detach() if anchor is None else anchor.view(-1, k)  # None: no update since generation
        rewards = inputs["advantages"].view(-1, k)  # R - mean R; the loss centres again (a no-op)
        loss = _gvpo_loss(logp, logp_anchor, rewards, self.args.gvpo_beta)  # mean over groups
        if self.args.gvpo_reduction == "sum":
            loss = loss * logp.shape[0]
        accumulated = self.current_gradient_accumulation_steps if training else 1  # as TRL's losses
        loss = loss / accumulated
        if aux_loss is not None:  # MoE load balancing, as TRL adds it
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulated
        rho = logp.detach() - logp_anchor  # [groups, k]
        self._metrics["train" if training else "eval"]["gvpo/rho_mean"].append(
            self.accelerator.gather(rho.mean()).mean().item())
        return loss
