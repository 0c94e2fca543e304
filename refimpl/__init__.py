"""refimpl: reference implementations for KL-constrained reward maximization with language models.

Foundations: :mod:`refimpl.kl` (the exact optimum), :mod:`refimpl.resample` (choosing one of k
candidates by softmax(score / beta), and the law of that choice), :mod:`refimpl.lm` (log-probs,
sampling, embeddings for any causal LM), :mod:`refimpl.models` (the book's models and
``load_model``), :mod:`refimpl.worlds` (the exact world and the arithmetic task world),
:mod:`refimpl.pools` (samples with rewards and features), :mod:`refimpl.metrics` (pass@k and
intervals), :mod:`refimpl.checks` (argument checks), :mod:`refimpl.config` (scale, device, cache).
Methods: :mod:`refimpl.qprobe`; :mod:`refimpl.gvpo`, :mod:`refimpl.grpo` and their trainers in
:mod:`refimpl.rl` (a causal LM) and :mod:`refimpl.tabular` (the exact world) (and :mod:`refimpl.trl_gvpo` on TRL); :mod:`refimpl.idle`
with :mod:`refimpl.constraints` (prefix-dependent banned sets) and :mod:`refimpl.smc` (sequential
Monte Carlo); :mod:`refimpl.rft`. Neighbours of pi*: :mod:`refimpl.bestofn` (best-of-n and
rejection sampling), :mod:`refimpl.dpo` (pairs: :mod:`refimpl.preferences`), :mod:`refimpl.klpg`
(KL-regularized policy gradient), :mod:`refimpl.klest` (per-token KL estimators);
:mod:`refimpl.frontier` (the reward-KL frontier and optimizers' paths).
:mod:`refimpl.report` records each chapter's numbers and claims.
"""
from . import (bestofn, checks, config, constraints, dpo, grpo, gvpo, idle, kl, klpg, lm, metrics, models, pools, qprobe,
               report, resample, rft, rl, sampling, smc, tabular, worlds)
from . import particles, tracking, twist
from . import allowed, losses
from . import frontier, klest, preferences
from .config import get_scale
from .models import load_model

__all__ = ["bestofn", "checks", "config", "constraints", "dpo", "grpo", "gvpo", "idle", "kl", "klpg", "lm", "metrics",
           "models", "pools", "qprobe", "report", "resample", "rft", "rl", "sampling", "smc", "tabular", "worlds", "get_scale",
           "load_model"]
__all__ += ["allowed", "losses"]  # log w(y) by forward passes; the loss table of rl
__all__ += ["particles", "tracking", "twist"]  # resampling; a constraint through generate; twisted SMC
__all__ += ["frontier", "klest", "preferences"]  # reward-KL paths, per-token KL estimators, preference labels
__version__ = "0.2.0"
