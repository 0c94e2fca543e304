"""refimpl: reference implementations for KL-constrained reward maximization with language models.

Modules: :mod:`refimpl.kl` (the exact optimum), :mod:`refimpl.lm` (log-probs, sampling,
embeddings for any causal LM), :mod:`refimpl.models` (toy models and ``load_model``),
:mod:`refimpl.worlds` (the exact world and the arithmetic task world); one module per method:
:mod:`refimpl.qprobe`, :mod:`refimpl.gvpo` (and :mod:`refimpl.trl_gvpo` on TRL), :mod:`refimpl.idle`;
:mod:`refimpl.report` collects each chapter's numbers and claims for the results page.
"""
from . import config, gvpo, idle, kl, lm, metrics, models, qprobe, report, rft, worlds
from .config import get_scale
from .models import load_model

__all__ = ["config", "gvpo", "idle", "kl", "lm", "metrics", "models", "qprobe", "report", "rft", "worlds", "get_scale", "load_model"]
__version__ = "0.1.0"
