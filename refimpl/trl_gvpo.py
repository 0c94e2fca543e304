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
  ``per_device_train_batch_size`` like TRL's old-log-prob pass, which is then skipped (as it is in
  evaluation, where the anchor is the current policy).

**The authors' regime** (policy at the start of the rollout as anchor, several sequential
mini-batch updates per rollout: 1024 prompts × k=4 per rollout, mini-batches of 256 prompts, beta
0.1, constant lr 1e-6, weight decay 0.01, grad clip 1.0, the summed loss) is
:func:`authors_config` (``gvpo_anchor="old"``, ``steps_per_generation = 4 ×
gradient_accumulation_steps``; on 8 GPUs 16 completions per device, 8 accumulated, 32 per rollout).
Other regimes reuse a rollout with ``num_iterations > 1`` (epochs over it). A multi-GPU launch
(``train.py`` builds a ``GVPOTrainerConfig``, e.g. ``authors_config(out, num_processes=8)``, and a
``GVPOTrainer``, and calls ``train()``)::

    accelerate launch --num_processes 8 --config_file zero3.yaml train.py
    # zero3.yaml: distributed_type: DEEPSPEED
    #             deepspeed_config: {zero_stage: 3, zero3_init_flag: true}
    # or FSDP:    distributed_type: FSDP
    #             fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP}

Settings that would put a wrong term into a group's statistics are refused: TRL's
``mask_truncated_completions`` (a zeroed mask gives rho = 0, which enters the group's mean) raises
in :class:`GVPOTrainerConfig`, and a completion with no finite reward (every reward function returned
``None``/NaN, which TRL turns into advantage 0, or one returned ±inf) raises ``ValueError`` naming the
reward functions. A ``None`` from some of several reward functions keeps TRL's meaning (that function
does not apply; the others' weighted sum is the reward).

``gvpo/rho_mean`` logs the mean rho; ``gvpo/kl_ref`` the mean log pi_theta - log pi_ref per
completion, an estimate of KL(pi_theta || pi_ref) on the generating policy's samples (with the "old"
anchor it needs the frozen reference, see ``gvpo_log_kl_ref``). The reference is built with the
policy's ``quantization_config`` (the trainer's argument, else the policy's own). On several
processes each one holds whole groups (``per_device_train_batch_size`` a multiple of k) and DDP
averages the processes' gradients: with "mean" the update equals one process accumulating the same
micro-batches. The settings and :func:`authors_config` live in :mod:`refimpl.trl_gvpo_config` and
are re-exported here.

The subclass overrides private ``GRPOTrainer`` methods; it is tested with ``trl`` 1.16 (the pin in
the ``trl`` extra) and raises ``RuntimeError`` naming the installed version when one of them is
missing or has changed its signature. Requires ``trl`` (``pip install -e ".[trl]"``).
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
from trl import GRPOTrainer

from .gvpo import _gvpo_loss
from .trl_gvpo_config import (AUTHORS_REGIME, TESTED_TRL, GVPOTrainerConfig, _MM_KEYS, _trl_error,  # noqa: F401
                              authors_config, check_trl_api)  # re-exported

try:
    from accelerate.utils import is_peft_model
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import (add_fused_lm_head, create_model_from_path, disable_dropout_in_model,
                                   get_config_model_id, split_pixel_values_by_grid, split_tensor_dict,
                                   unsplit_pixel_values_by_grid, use_adapter)
except ImportError as err:  # a moved helper
    raise _trl_error(f"lacks a helper: {err}") from err

# GVPOTrainerConfig, authors_config, AUTHORS_REGIME, check_trl_api and TESTED_TRL are re-exported from trl_gvpo_config
__all__ = ["GVPOTrainer"]


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
        ref_model: the frozen reference, for ``gvpo_anchor="reference"`` or ``gvpo_log_kl_ref``: a
            model or a checkpoint path (default: the policy's checkpoint, ``model.config._name_or_path``,
            as TRL loads its own reference, with the policy's ``quantization_config``; for a PEFT
            policy, the policy with its adapters disabled).
    """

    def __init__(self, *args, ref_model=None, **kwargs):
        check_trl_api()
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs).arguments
        super().__init__(*args, **kwargs)
        check_trl_api(self)
        if not isinstance(self.args, GVPOTrainerConfig):
            raise TypeError(f"args must be a GVPOTrainerConfig, got {type(self.args).__name__}")
        uses_ref = self.args.gvpo_anchor == "reference" or self.args.gvpo_log_kl_ref
        if ref_model is not None and not uses_ref:
            raise ValueError("ref_model is used only with gvpo_anchor='reference' or gvpo_log_kl_ref=True, got "
                             f"gvpo_anchor={self.args.gvpo_anchor!r}, gvpo_log_kl_ref=False")
        self.gvpo_uses_ref = uses_ref
        self.gvpo_ref_model = None  # None and uses_ref: a PEFT policy with its adapters off
        if uses_ref and not (ref_model is None and is_peft_model(self.model)):
            quantization = bound.get("quantization_config") or getattr(self.model.config, "quantization_config", None)
            self.gvpo_ref_model = self._prepare_gvpo_reference(ref_model, quantization)

    def _gvpo_reference_kwargs(self, quantization_config) -> dict:
        """``from_pretrained`` arguments of the reference: TRL's for its ``ref_model``, the policy's quantization."""
        kwargs = dict(self.args.model_init_kwargs or {})
        if quantization_config is not None:  # as TRL: the trainer's argument wins over model_init_kwargs
            kwargs["quantization_config"] = quantization_config
        if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            kwargs["device_map"] = None  # as TRL: "auto" fails under distributed training
        kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        kwargs.setdefault("dtype", self.model.dtype)
        kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
        return kwargs

    def _prepare_gvpo_reference(self, ref_model, quantization_config=None):
        """The frozen reference, built and wrapped like GRPOTrainer's ``ref_model`` (sharded under ZeRO-3/FSDP)."""
        if ref_model is None or isinstance(ref_model, str):
            path = ref_model or get_config_model_id(self.model.config)
            if not path:
                raise ValueError("ref_model: the policy has no checkpoint path (config._name_or_path) to load the "
                                 "reference from; pass ref_model= (a model or a path)")
            ref_model = create_model_from_path(path, **self._gvpo_reference_kwargs(quantization_config))
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

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's [B_global, n_funcs] rewards (gathered over processes), refused unless each completion has one."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        unscored, infinite = rewards.isnan().all(dim=1), rewards.isinf()
        if bool(unscored.any() | infinite.any()):  # identical on every process: all of them raise
            names = list(self.reward_func_names)
            if unscored.any():
                what = (f"every reward function ({names}) returned None or NaN for completion "
                        f"{int(unscored.int().argmax())} of the generation batch")
            else:
                what = f"{[names[j] for j in infinite.any(dim=0).nonzero()[:, 0].tolist()]} returned ±inf"
            raise ValueError(f"reward_funcs: {what}; GVPO needs a finite reward for every completion of a group "
                             "(TRL would give an unscored one advantage 0 while its rho still enters the group's "
                             "mean): return a reward for it, e.g. the lowest")
        return rewards

    def _generate_and_score_completions(self, inputs):
        """TRL's batch plus ``gvpo_logp_ref`` [B] if a reference is used, ``gvpo_logp_anchor`` [B] if needed."""
        training = self.model.training
        skip_old = self.args.gvpo_anchor == "reference" or not training  # TRL's old-log-prob pass would be unused
        if skip_old:  # with beta = 0 and no vLLM IS (GVPOTrainerConfig) it is TRL's only forward pass in there
            self._get_per_token_logps_and_entropies = lambda *args, **kwargs: (None, None, None)
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            if skip_old:
                del self._get_per_token_logps_and_entropies  # back to the class's method
        if self.gvpo_uses_ref:
            batch_size = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
            ref, context = self.gvpo_ref_model, nullcontext()
            if ref is None:  # a PEFT policy with its adapters off (or its "ref" adapter), as TRL does
                unwrapped = self.accelerator.unwrap_model(self.model)
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            with torch.no_grad(), context:
                out["gvpo_logp_ref"], _ = self._gvpo_logps(self.model if ref is None else ref, out, batch_size)
        if self.args.gvpo_anchor == "reference":
            out["gvpo_logp_anchor"] = out["gvpo_logp_ref"]
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
        stats = {"gvpo/rho_mean": (logp.detach() - logp_anchor).mean()}  # each [], averaged over processes
        if inputs.get("gvpo_logp_ref") is not None:
            stats["gvpo/kl_ref"] = (logp.detach() - inputs["gvpo_logp_ref"].view(-1, k)).mean()
        gathered = self.accelerator.gather(torch.stack(list(stats.values()))[None]).mean(dim=0).tolist()
        for name, value in zip(stats, gathered):
            self._metrics["train" if training else "eval"][name].append(value)
        return loss
