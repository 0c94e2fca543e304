r"""Settings of GVPO on TRL (:mod:`refimpl.trl_gvpo`): ``GVPOTrainerConfig``, the authors' regime, and
the check that the private TRL API the trainer overrides is still there.

:class:`GVPOTrainerConfig` is TRL's ``GRPOConfig`` with GVPO's settings (Zhang et al. 2025): beta,
the anchor of rho = log pi_theta - log pi_anchor, the reduction over groups, and whether to log the
KL to the reference. Its defaults switch TRL's reward scaling, KL term and importance sampling off
and it raises ``ValueError`` for any setting that GVPO's loss would silently ignore or that would put
a wrong term in a group's statistics. :func:`authors_config` builds the authors' regime. Requires
``trl`` (``pip install -e ".[trl]"``).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, fields

import trl
from packaging.specifiers import SpecifierSet
from trl import GRPOConfig, GRPOTrainer

from . import checks

__all__ = ["GVPOTrainerConfig", "authors_config", "AUTHORS_REGIME", "check_trl_api", "TESTED_TRL"]

TESTED_TRL = ">=1.16,<1.17"
# GRPOTrainer's private methods refimpl.trl_gvpo overrides or calls, with their leading parameters
_PRIVATE_METHODS = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss"),
    "_prepare_inputs": ("self", "generation_batch"),
    "_compute_loss": ("self", "model", "inputs"),
}
# instance attributes GRPOTrainer.__init__ sets and refimpl.trl_gvpo reads or writes
_PRIVATE_ATTRS = ("_step", "_buffered_inputs", "_metrics", "num_generations", "num_iterations", "temperature",
                  "aux_loss_enabled", "router_aux_loss_coef", "reward_func_names")
# multimodal inputs TRL's forward passes take from the batch
_MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _trl_error(what: str) -> RuntimeError:
    return RuntimeError(f"refimpl.trl_gvpo relies on private GRPOTrainer internals of trl{TESTED_TRL}, but the "
                        f"installed trl {trl.__version__} {what}; install a tested one: pip install 'trl{TESTED_TRL}'")


def check_trl_api(trainer=None) -> None:
    """Raise ``RuntimeError`` (naming the installed TRL) if a private TRL API refimpl.trl_gvpo uses is gone.

    Checks that each overridden or called ``GRPOTrainer`` method exists with its 1.16 leading
    parameters, that TRL's loss is flagged as already scaled for gradient accumulation, and, given a
    constructed ``trainer``, the private attributes read there. Runs at import and in ``GVPOTrainer``.
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
    gvpo_log_kl_ref: bool = field(default=True, metadata={
        "help": "Log gvpo/kl_ref, mean log pi_theta - log pi_ref per completion. With gvpo_anchor='old' it costs a "
                "frozen reference and one forward pass per generation batch (False saves them); with 'reference' "
                "it is free and must stay True."})
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
        checks.choice("gvpo_log_kl_ref", self.gvpo_log_kl_ref, (True, False))
        if self.gvpo_anchor == "reference" and not self.gvpo_log_kl_ref:
            raise ValueError("gvpo_log_kl_ref must stay True with gvpo_anchor='reference' (the KL to the reference "
                             "is then the logged rho and costs nothing)")
        if self.beta != 0.0:
            raise ValueError(f"beta must be 0.0 (TRL's KL penalty; GVPO's KL coefficient is gvpo_beta), "
                             f"got {self.beta}")
        if self.scale_rewards != "none":
            raise ValueError(f"scale_rewards must be 'none' or False (GVPO's rewards are centred, not divided by "
                             f"their std), got {self.scale_rewards!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("multi_objective_aggregation must be 'sum_then_normalize' (with scale_rewards='none': "
                             f"weighted sum, then group centring), got {self.multi_objective_aggregation!r}")
        if self.mask_truncated_completions:
            raise ValueError("mask_truncated_completions must be False: TRL zeroes a truncated completion's mask, "
                             "which leaves it in its group with log pi = 0, so rho = 0 enters the group's mean rho; "
                             "give truncated completions a low reward instead")
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
                                 "so that every micro-batch, on every process, holds whole groups")


#: The authors' regime (Zhang et al. 2025, code jszkc/GVPO): k = 4 completions per prompt, beta 0.1, the policy
#: at the start of the rollout as anchor, their summed loss, a constant learning rate 1e-6 (TRL's default AdamW)
#: with weight decay 0.01, gradient clipping at 1.0; each rollout of 1024 prompts is used for 4 sequential
#: optimizer steps of 256 prompts (one pass: num_iterations 1).
AUTHORS_REGIME = dict(num_generations=4, gvpo_beta=0.1, gvpo_anchor="old", gvpo_reduction="sum", learning_rate=1e-6,
                      lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, num_iterations=1)
_PROMPTS_PER_ROLLOUT, _STEPS_PER_ROLLOUT = 1024, 4


def authors_config(output_dir: str, num_processes: int = 8, per_device_train_batch_size: int = 16,
                   **overrides) -> GVPOTrainerConfig:
    """The authors' regime as a :class:`GVPOTrainerConfig` for ``num_processes`` processes.

    :data:`AUTHORS_REGIME` plus the batch geometry that gives 1024 prompts × k completions per
    rollout and 4 optimizer steps of 256 prompts each: ``gradient_accumulation_steps`` = 256·k /
    (``per_device_train_batch_size`` · ``num_processes``) and ``steps_per_generation`` = 4 ×
    ``gradient_accumulation_steps``. On 8 processes: 16 per device, 8 accumulated, 32 per rollout.

    Args:
        output_dir: where the trainer writes.
        num_processes: processes of the ``accelerate launch`` (one per GPU).
        per_device_train_batch_size: completions per micro-batch (a multiple of k = 4).
        **overrides: any other ``GVPOTrainerConfig`` field (``max_completion_length``, ``bf16``,
            ``report_to``, …); the fields of :data:`AUTHORS_REGIME` and the batch geometry raise.

    Returns:
        the config; ``ValueError`` if 256·k completions cannot be split evenly into micro-batches.
    """
    num_processes = checks.integer("num_processes", num_processes, low=1)
    per_device = checks.integer("per_device_train_batch_size", per_device_train_batch_size, low=1)
    fixed = set(AUTHORS_REGIME) | {"gradient_accumulation_steps", "steps_per_generation", "generation_batch_size"}
    for name in sorted(fixed & set(overrides)):
        raise ValueError(f"{name} is fixed by the authors' regime (AUTHORS_REGIME and its batch geometry); "
                         f"build GVPOTrainerConfig directly to change it")
    per_step = _PROMPTS_PER_ROLLOUT // _STEPS_PER_ROLLOUT * AUTHORS_REGIME["num_generations"]  # 1024 completions
    if per_step % (per_device * num_processes) != 0:
        raise ValueError(f"per_device_train_batch_size × num_processes ({per_device} × {num_processes}) must divide "
                         f"the {per_step} completions of an optimizer step")
    accumulation = per_step // (per_device * num_processes)
    return GVPOTrainerConfig(output_dir=output_dir, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation,
                             steps_per_generation=_STEPS_PER_ROLLOUT * accumulation, **AUTHORS_REGIME, **overrides)
