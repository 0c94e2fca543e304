r"""Q-probes: a linear probe on a frozen model's features, used to pick among k samples.

Li, Jelassi, Zhang, Kakade, Wattenberg and Brandfonbrener, "Q-Probe: A Lightweight Approach to
Reward Maximization for Language Models" (ICML 2024, arXiv 2402.14688). With
phi(x, y) the hidden state of the last completion token of (x, y) and Q(x, y) = w·phi(x, y) + b:

* inference: draw y_1..y_k ~ pi_base(.|x), p_i = softmax_i(Q_i / beta), return y_I, I ~ p
  (beta = 0: argmax). Its exact expected reward is sum_i p_i r_i;
* reward-modelling losses: L_Q = mean (Q - r)^2 and L_CE = BCE(sigmoid Q, r);
* the policy-learning loss L_PG = -E_x sum_i softmax_i(Q_i / beta) r_i over chunks of k samples;
* preferences: Bradley-Terry L_BT = -log sigmoid(Q_chosen - Q_rejected).

As k grows the sampler tends to pi_base·exp(Q/beta)/Z, the KL-constrained optimum for reward Q
(chapter ``qprobe``). :func:`collect` produces the tensors all of this needs from a model.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lm

__all__ = ["QProbe", "selection_weights", "expected_reward", "select", "mse_loss", "ce_loss",
           "pg_loss", "bt_loss", "LOSSES", "train_probe", "chunk_expected_reward", "sampler_law",
           "collect", "embed_texts"]


class QProbe(nn.Module):
    """Q(x, y) = w·phi(x, y) + b (``hidden=None``), or a one-hidden-layer ReLU MLP (ablation)."""

    def __init__(self, d: int, hidden: int | None = None):
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive int, got {d!r}")
        if hidden is None:
            self.net = nn.Linear(d, 1)
        elif isinstance(hidden, int) and hidden >= 1:
            self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            raise ValueError(f"hidden must be None or a positive int, got {hidden!r}")

    def forward(self, features: Tensor) -> Tensor:
        """[..., d] features -> [...] Q values."""
        return self.net(features).squeeze(-1)


def _check_q(q: Tensor, beta: float, name: str = "q") -> None:
    if not isinstance(q, Tensor) or not q.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if q.dim() == 0 or q.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension of k >= 1 candidates, got shape {tuple(q.shape)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be >= 0 and finite, got {beta}")


def _check_rewards(q: Tensor, rewards: Tensor) -> None:
    if not isinstance(rewards, Tensor):
        raise TypeError("rewards must be a tensor")
    if rewards.shape != q.shape:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but q has shape {tuple(q.shape)}")


def selection_weights(q: Tensor, beta: float) -> Tensor:
    r"""p_i = softmax_i(Q_i / beta) over the last dim; beta = 0 gives a one-hot argmax.

    Ties at beta = 0 go to the first index (``torch.argmax``'s documented rule).

    Args:
        q: [..., k] probe values of k candidates.
        beta: temperature, >= 0.

    Returns:
        [..., k] selection probabilities.
    """
    _check_q(q, beta)
    if beta == 0:
        return F.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
    return torch.softmax(q / beta, dim=-1)


def expected_reward(q: Tensor, rewards: Tensor, beta: float) -> Tensor:
    r"""sum_i p_i r_i: the exact expected reward of one softmax-over-k draw.

    Args:
        q, rewards: [..., k].

    Returns:
        [...] expected reward.
    """
    _check_q(q, beta)
    _check_rewards(q, rewards)
    return (selection_weights(q, beta) * rewards).sum(-1)


def select(q: Tensor, beta: float, generator: torch.Generator | None = None) -> Tensor:
    """Indices I ~ softmax(Q / beta) of the chosen candidates (argmax at beta = 0).

    Args:
        q: [..., k].
        generator: for reproducible draws (on q's device).

    Returns:
        [...] long indices in 0..k-1.
    """
    p = selection_weights(q, beta)  # [..., k]
    if beta == 0:
        return p.argmax(-1)
    flat = p.reshape(-1, p.shape[-1])  # [B, k]
    return torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])


def mse_loss(q: Tensor, rewards: Tensor) -> Tensor:
    """L_Q = mean (Q - r)^2 (reward modelling by regression)."""
    _check_rewards(q, rewards)
    return F.mse_loss(q, rewards)


def ce_loss(q: Tensor, rewards: Tensor) -> Tensor:
    """L_CE = mean BCE(sigmoid Q, r), for rewards in [0, 1] (reward modelling by classification)."""
    _check_rewards(q, rewards)
    return F.binary_cross_entropy_with_logits(q, rewards)


def pg_loss(q: Tensor, rewards: Tensor, beta: float = 1.0) -> Tensor:
    r"""L_PG = -(1/P) sum_x sum_i softmax_i(Q_i / beta) r_i over chunks of k candidates.

    Its gradient is dL/dQ_i = -(1/(beta P)) p_i (r_i - sum_j p_j r_j): a baseline-subtracted
    policy gradient for the softmax-over-k policy, so adding a constant to r changes nothing.

    Args:
        q, rewards: [P, k] (or [..., k]; the mean runs over all leading dims).
        beta: temperature, > 0 (the argmax at beta = 0 has no gradient).
    """
    _check_q(q, beta)
    _check_rewards(q, rewards)
    if beta == 0:
        raise ValueError("beta must be > 0 for pg_loss (the argmax has no gradient)")
    return -expected_reward(q, rewards, beta).mean()


def bt_loss(q_chosen: Tensor, q_rejected: Tensor) -> Tensor:
    """L_BT = mean -log sigmoid(Q_chosen - Q_rejected) (Bradley-Terry on preference pairs)."""
    _check_rewards(q_chosen, q_rejected)
    return -F.logsigmoid(q_chosen - q_rejected).mean()


LOSSES = ("mse", "ce", "pg", "bt")


def _batches(features: Tensor, rewards: Tensor, loss: str, k: int, batch_size: int,
             g: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """One epoch of shuffled minibatches: [b, d]/[b] samples, or [b, k, d]/[b, k] chunks for PG,
    [b, 2, d]/[b, 2] pairs for BT."""
    P, n, d = features.shape
    dev = features.device
    if loss == "pg":
        # Reshuffle each prompt's samples, then cut them into n // k disjoint chunks of k.
        perm = torch.argsort(torch.rand(P, n, generator=g), dim=1).to(dev)  # [P, n]
        m = (n // k) * k
        f = features.gather(1, perm[:, :m, None].expand(-1, -1, d)).reshape(-1, k, d)  # [P*n/k, k, d]
        r = rewards.gather(1, perm[:, :m]).reshape(-1, k)  # [P*n/k, k]
    elif loss == "bt":
        f, r = features, rewards  # [P, 2, d], [P, 2]: one pair per row
    else:
        f, r = features.reshape(P * n, d), rewards.reshape(P * n)  # [P*n, d], [P*n]
    order = torch.randperm(f.shape[0], generator=g).to(dev)  # drawn on the CPU: same on every device
    return [(f[order[s : s + batch_size]], r[order[s : s + batch_size]])
            for s in range(0, f.shape[0], batch_size)]


def _loss(probe: QProbe, f: Tensor, r: Tensor, loss: str, beta: float) -> Tensor:
    q = probe(f)
    if loss == "mse":
        return mse_loss(q, r)
    if loss == "ce":
        return ce_loss(q, r)
    if loss == "pg":
        return pg_loss(q, r, beta)
    chosen = (r[:, 1] > r[:, 0]).long()  # [b]: column of the preferred item
    q_c = q.gather(1, chosen[:, None]).squeeze(1)
    q_r = q.gather(1, 1 - chosen[:, None]).squeeze(1)
    return bt_loss(q_c, q_r)


def train_probe(features: Tensor, rewards: Tensor, loss: str = "pg", beta: float = 1.0, k: int = 10,
                epochs: int = 150, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 1000,
                hidden: int | None = None, seed: int = 0, device: torch.device | str | None = None
                ) -> tuple[QProbe, list[float]]:
    r"""Train a Q-probe with AdamW on frozen features.

    ``loss="mse"``/``"ce"`` see samples one by one (batches of ``batch_size`` samples);
    ``loss="pg"`` sees chunks of ``k`` samples of the same prompt, reshuffled every epoch (batches
    of ``batch_size // k`` chunks); ``loss="bt"`` sees one preference pair per row, the preferred
    item being the one with the larger reward.

    Args:
        features: [P, n, d] features of n samples for each of P prompts ([P, 2, d] for ``"bt"``).
        rewards: [P, n] rewards ([P, 2] preference labels, unequal within a row, for ``"bt"``).
        loss: one of ``"mse"``, ``"ce"``, ``"pg"``, ``"bt"``.
        beta: training temperature of ``"pg"``, > 0.
        k: chunk size of ``"pg"``, 1 <= k <= n.
        hidden: MLP hidden size (``None``: linear probe).
        seed: initialisation and shuffling seed.
        device: where to train (default: the features' device).

    Returns:
        ``(probe, curve)``: the trained probe (in eval mode, on ``device``) and the mean training
        loss of every epoch.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError("features must be a 3-D tensor [P, n, d]")
    if not isinstance(rewards, Tensor) or rewards.shape != features.shape[:2]:
        raise ValueError(f"rewards must have shape {tuple(features.shape[:2])} (features' [P, n])")
    if not isinstance(k, int) or not 1 <= k <= features.shape[1]:
        raise ValueError(f"k must be an int in [1, n={features.shape[1]}], got {k!r}")
    if loss == "pg":
        _check_q(rewards.float(), beta, "rewards")
        if beta == 0:
            raise ValueError("beta must be > 0 for loss='pg'")
    if loss == "bt" and (features.shape[1] != 2 or bool((rewards[:, 0] == rewards[:, 1]).any())):
        raise ValueError("loss='bt' needs features [P, 2, d] and rewards [P, 2] with unequal entries")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    device = torch.device(device) if device is not None else features.device
    features, rewards = features.to(device, torch.float32), rewards.to(device, torch.float32)
    torch.manual_seed(seed)
    probe = QProbe(features.shape[-1], hidden).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)  # CPU shuffles, so every device sees the same batches
    per_batch = max(1, batch_size // k) if loss == "pg" else batch_size
    curve = []
    for _ in range(epochs):
        total = torch.zeros((), device=device)
        batches = _batches(features, rewards, loss, k, per_batch, g)
        for f, r in batches:
            value = _loss(probe, f, r, loss, beta)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total = total + value.detach()
        curve.append(total / len(batches))
    probe.eval()
    return probe, torch.stack(curve).tolist()  # one host sync, at the end


def chunk_expected_reward(q: Tensor, rewards: Tensor, k: int, beta: float) -> Tensor:
    r"""Mean of sum_i p_i r_i over the disjoint chunks of k of each prompt's n samples (the paper's
    evaluation).

    Args:
        q, rewards: [P, n]; the first (n // k)·k samples are used.

    Returns:
        [P] the expected reward of the softmax-over-k sampler for each prompt.
    """
    _check_rewards(q, rewards)
    if not isinstance(k, int) or not 1 <= k <= q.shape[-1]:
        raise ValueError(f"k must be an int in [1, n={q.shape[-1]}], got {k!r}")
    P, n = q.shape
    m = (n // k) * k
    return expected_reward(q[:, :m].reshape(P, -1, k), rewards[:, :m].reshape(P, -1, k), beta).mean(-1)


def sampler_law(logp_base: Tensor, q: Tensor, beta: float, ks: Sequence[int], n_mc: int = 2000,
                generator: torch.Generator | None = None) -> Tensor:
    r"""log P_k: the law of the softmax-over-k sampler's output, over a finite support.

    P_k(y) = pi_base(y) w(y) E[k / (w(y) + sum_{j=2}^k w(Y_j))], w = exp(Q/beta), Y_j ~ pi_base,
    estimated by Monte Carlo over the k-1 other draws. The same ``n_mc`` draws serve every y and
    every k (cumulative sums), and each estimate is normalized (a ratio estimator).

    Args:
        logp_base: [..., N] log pi_base.
        q: [..., N] Q(y) for every y of the support.
        beta: > 0.
        ks: candidate counts k >= 1.
        n_mc: Monte Carlo draws.

    Returns:
        [len(ks), ..., N] log P_k.
    """
    _check_q(q, beta)
    if beta == 0:
        raise ValueError("beta must be > 0 for sampler_law")
    _check_rewards(q, logp_base)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of ints >= 1, got {ks!r}")
    shape, N, K = q.shape, q.shape[-1], max(ks)
    base = logp_base.reshape(-1, N).exp()  # [R, N]
    w = torch.exp((q - q.amax(-1, keepdim=True)) / beta).reshape(-1, N)  # [R, N], scaled: the law is scale-free
    R = w.shape[0]
    if K > 1:
        idx = torch.multinomial(base, n_mc * (K - 1), replacement=True, generator=generator)  # [R, n_mc*(K-1)]
        sums = w.gather(1, idx).view(R, n_mc, K - 1).cumsum(-1)  # [R, n_mc, K-1]: first j others
    out = []
    for k in ks:
        others = sums[..., k - 2] if k > 1 else torch.zeros(R, n_mc, dtype=w.dtype, device=w.device)  # [R, n_mc]
        p = base * w * (k / (w[:, None, :] + others[..., None])).mean(1)  # [R, N]
        out.append((p / p.sum(-1, keepdim=True)).log().view(shape))
    return torch.stack(out)


def embed_texts(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], layer: int = -1,
                batch_size: int = 1024) -> Tensor:
    """phi(x, y) for text pairs, tokenized by ``tokenizer`` (a model other than the sampler's).

    The completion is tokenized without special tokens and appended to the prompt.

    Returns:
        [B, d] float32 features.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts has {len(prompts)} entries but completions has {len(completions)}")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    x = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    tokenizer.padding_side = "right"
    y = tokenizer(list(completions), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = "left"
    return lm.embed(model, x["input_ids"], x["attention_mask"], y["input_ids"], y["attention_mask"],
                    layer=layer, batch_size=batch_size)


def collect(model, tokenizer, prompts: Sequence[str], targets: Sequence, reward_fn: Callable, k: int,
            layer: int = -1, seed: int = 0, max_new_tokens: int = 8, temperature: float = 1.0,
            batch_size: int = 1024) -> tuple[Tensor, Tensor, list[str]]:
    r"""Sample k completions per prompt, score them, and embed all P·k of them.

    1. ``lm.sample``: k completions per prompt (one batched ``generate``).
    2. ``reward_fn(texts, targets)``: one reward per completion.
    3. ``lm.embed``: phi at ``layer`` of the last completion token, in batched forwards over
       already-generated tokens (one parallel pass instead of a decoding loop: far cheaper than
       generating where decoding is memory-bound, as on a GPU; about as costly on a CPU, where
       both are compute-bound over the same tokens -- see ``bench/bench_qprobe.py``).

    Returns:
        ``(features [P, k, d], rewards [P, k], texts)``; texts are prompt-major (P·k strings).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}")
    s = lm.sample(model, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed)  # lm.sample's own batching: the same seed gives the same samples
    P = len(prompts)
    device = s.completion_ids.device
    rewards = reward_fn(s.texts, [t for t in targets for _ in range(k)]).to(device).float()
    features = lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                        layer=layer, batch_size=batch_size)  # [P*k, d]
    return features.reshape(P, k, -1), rewards.reshape(P, k), s.texts  # prompt-major rows
