"""One place for sizes: ``REFIMPL_SCALE`` selects ``smoke`` (default, CPU minutes) or ``full`` (GPU).

Every notebook and script reads its sizes from :func:`get_scale`, so switching the whole book
to the large setting is one environment variable::

    python scripts/run_scale.py --scale full

How ``full`` is sized: the whole run (models and every chapter) is meant to fit one call of at
most 9 minutes on one H100. At these model sizes a GPU step costs its kernel launches and Python,
not its FLOPs, so rows in a batch are almost free and sequential steps are what cost: ``full``
grows what is batched (samples per prompt, pretraining batch, prompts per RL step) and the model,
and keeps the count of sequential steps within a small factor of ``smoke``'s (the GVPO chapter:
about 2,400 RL steps against 456). This is an estimate, not yet a measurement (30 to 100 ms per
RL step of 16 prompts x 8 completions with 4 updates, about 5 ms per pretraining step): on a GPU
run ``scripts/run_scale.py --scale full --dry-run`` first, then the chapters in separate calls
(``--chapters``; their results merge) until ``run.json``'s wall times show that one call fits.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Scale", "SCALES", "get_scale", "cache_dir", "device", "quiet"]


@dataclass(frozen=True)
class Scale:
    """Sizes that change between the CPU (smoke) and GPU (full) settings."""

    name: str
    arith_layers: int  # transformer blocks of the task-world model
    arith_width: int  # hidden size d of the task-world model
    arith_heads: int  # attention heads of the task-world model
    arith_steps: int  # pretraining steps of the task-world model
    arith_batch: int  # pretraining batch (sequences)
    samples_per_prompt: int  # completions drawn per prompt in the chapters
    seeds: int  # independent seeds for spreads and confidence intervals
    rl_steps: int  # policy-training steps (rollouts) per run on the task world in the GVPO chapter
    rl_seeds: int  # training seeds per base model and method in the GVPO chapter (each a training run)


SCALES: dict[str, Scale] = {
    "smoke": Scale("smoke", arith_layers=3, arith_width=96, arith_heads=8, arith_steps=1500,
                   arith_batch=64, samples_per_prompt=96, seeds=3, rl_steps=8, rl_seeds=1),
    "full": Scale("full", arith_layers=4, arith_width=256, arith_heads=8, arith_steps=2000,
                  arith_batch=256, samples_per_prompt=384, seeds=3, rl_steps=16, rl_seeds=2),
}


def get_scale(name: str | None = None) -> Scale:
    """The :class:`Scale` named by ``name`` or by ``$REFIMPL_SCALE`` (default ``smoke``).

    ``$REFIMPL_SCALE_OVERRIDES`` (``"field=value,..."``, integers) replaces single sizes, e.g.
    ``arith_layers=2,seeds=2`` to try the full scale's code paths with a tiny model on a CPU.
    """
    name = name if name is not None else os.environ.get("REFIMPL_SCALE", "smoke")
    if name not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {name!r} (REFIMPL_SCALE)")
    overrides = os.environ.get("REFIMPL_SCALE_OVERRIDES", "").strip()
    if not overrides:
        return SCALES[name]
    fields = {f.name for f in dataclasses.fields(Scale)} - {"name"}
    changes = {}
    for item in overrides.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"REFIMPL_SCALE_OVERRIDES: expected field=positive integer with a field in "
                             f"{sorted(fields)}, got {item!r}")
        changes[key] = int(value)
    return dataclasses.replace(SCALES[name], **changes)


def cache_dir() -> Path:
    """Where trained toy models are cached: ``$REFIMPL_CACHE`` or ``~/.cache/refimpl``."""
    root = os.environ.get("REFIMPL_CACHE") or Path.home() / ".cache" / "refimpl"
    return Path(root)


def device(scale: Scale | str | None = None) -> torch.device:
    """The one place that picks a device: ``$REFIMPL_DEVICE`` if set; otherwise the CPU when
    ``scale`` is the smoke scale; otherwise CUDA when available, else the CPU.

    Without a ``scale`` (what :func:`refimpl.load_model` uses for a model you load yourself) a
    GPU is used when there is one. With the smoke scale, the chapters keep the task-world models
    on the CPU even on a GPU machine, because their printed numbers are checked on the CPU.
    """
    name = os.environ.get("REFIMPL_DEVICE")
    if name:
        return torch.device(name)
    if scale is not None:
        scale = scale if isinstance(scale, Scale) else get_scale(scale)
        if scale.name == "smoke":
            return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet() -> None:
    """Silence transformers' warnings and progress bars (for notebooks whose outputs are compared)."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # deprecation notices that libraries raise about their own internals (peft calling transformers)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
