r"""Q-probes: a probe on a frozen model's features, used to pick among k samples.

Li, Jelassi, Zhang, Kakade, Wattenberg and Brandfonbrener, "Q-Probe: A Lightweight Approach to
Reward Maximization for Language Models" (ICML 2024, arXiv 2402.14688). With
phi(x, y) the hidden state of the last completion token of (x, y) and Q(x, y) = w·phi(x, y) + b:

* inference: draw y_1..y_k ~ pi_base(.|x), p_i = softmax_i(Q_i / beta), return y_I, I ~ p
  (beta = 0: argmax), with :mod:`refimpl.resample`. Its exact expected reward is sum_i p_i r_i;
* reward-modelling losses: L_Q = mean (Q - r)^2 and L_CE = BCE(sigmoid Q, r);
* the policy-learning loss L_PG = -E_x sum_i softmax_i(Q_i / beta) r_i over chunks of samples
  of one prompt;
* preferences: Bradley-Terry L_BT = -log sigmoid(Q_chosen - Q_rejected), or the hinge
  L_hinge = max(0, m - (Q_chosen - Q_rejected)), margin m = 0.1 as in the authors' code ("clip").

As k grows the sampler tends to pi_base·exp(Q/beta)/Z, the KL-constrained optimum for reward Q
(chapter ``qprobe``). :func:`refimpl.pools.collect` produces the features and rewards.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .resample import _weights, expected_value

__all__ = ["QProbe", "mse_loss", "ce_loss", "pg_loss", "bt_loss", "hinge_loss", "LOSSES", "ProbeFit",
           "train_probe", "train_probes", "chunk_expected_reward"]


class QProbe(nn.Module):
    """Q(x, y) = w·phi(x, y) + b, or an MLP with ReLU hidden layers of the given widths.

    Args:
        d: feature dimension.
        hidden: hidden-layer widths; ``()`` is the linear probe, ``(256,)`` the paper's 2-layer
            and ``(256, 256)`` its 3-layer probe.
    """

    def __init__(self, d: int, hidden: Sequence[int] = ()):
        super().__init__()
        d = checks.integer("d", d, low=1)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden must be a sequence of layer widths, got {type(hidden).__name__}")
        widths = [d] + [checks.integer("hidden", h, low=1) for h in hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        # The linear probe is a bare nn.Linear (``probe.net.weight`` is w); an MLP a Sequential.
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 1)) if layers else nn.Linear(d, 1)

    def forward(self, features: Tensor) -> Tensor:
        """[..., d] features -> [...] Q values."""
        return self.net(features).squeeze(-1)


def _pair(q: Tensor, rewards: Tensor, name: str = "rewards", q_name: str = "q") -> tuple[Tensor, Tensor]:
    """Checked (q, rewards), in float32 if half precision (squares and differences of 6e4 overflow float16)."""
    checks.tensor(q_name, q, min_dims=1, floating=True)
    checks.tensor(name, rewards, floating=True)
    checks.same_device(**{q_name: q, name: rewards})
    checks.same_shape(**{q_name: q, name: rewards})
    checks.nonempty(q_name, q)  # a mean over no example is NaN
    checks.finite(q_name, q)
    checks.finite(name, rewards)
    return tuple(t if t.dtype in (torch.float32, torch.float64) else t.float() for t in (q, rewards))


def _unit_interval(name: str, rewards: Tensor) -> None:
    if bool(((rewards < 0) | (rewards > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1] for the cross-entropy loss (probabilities of success)")


def mse_loss(q: Tensor, rewards: Tensor) -> Tensor:
    """L_Q = mean (Q - r)^2 (reward modelling by regression)."""
    q, rewards = _pair(q, rewards)
    return F.mse_loss(q, rewards)


def ce_loss(q: Tensor, rewards: Tensor) -> Tensor:
    """L_CE = mean BCE(sigmoid Q, r), for rewards in [0, 1] (reward modelling by classification)."""
    q, rewards = _pair(q, rewards)
    _unit_interval("rewards", rewards)
    return F.binary_cross_entropy_with_logits(q, rewards)


def pg_loss(q: Tensor, rewards: Tensor, beta: float = 1.0) -> Tensor:
    r"""L_PG = -(1/P) sum_x sum_i softmax_i(Q_i / beta) r_i over chunks of candidates of one prompt.

    Its gradient is dL/dQ_i = -(1/(beta P)) p_i (r_i - sum_j p_j r_j): a policy gradient for the
    softmax-over-k policy whose baseline is the selection-weighted mean reward sum_j p_j r_j, so
    adding a constant to r changes nothing.

    Args:
        q, rewards: [P, m] (or [..., m]; the mean runs over all leading dims): m candidates per chunk.
        beta: temperature, > 0 (the argmax at beta = 0 has no gradient).
    """
    beta = checks.beta(beta)
    q, rewards = _pair(q, rewards)
    if q.shape[-1] < 2:
        raise ValueError("pg_loss needs chunks of at least 2 candidates (with one, softmax is constant "
                         "and the gradient is zero)")
    return -(_weights(q, beta) * rewards).sum(-1).mean()


def bt_loss(q_chosen: Tensor, q_rejected: Tensor) -> Tensor:
    """L_BT = mean -log sigmoid(Q_chosen - Q_rejected) (Bradley-Terry on preference pairs)."""
    q_chosen, q_rejected = _pair(q_chosen, q_rejected, "q_rejected", "q_chosen")
    return -F.logsigmoid(q_chosen - q_rejected).mean()


def hinge_loss(q_chosen: Tensor, q_rejected: Tensor, margin: float = 0.1) -> Tensor:
    """L_hinge = mean max(0, margin - (Q_chosen - Q_rejected)); the authors' code ("clip") uses margin 0.1."""
    q_chosen, q_rejected = _pair(q_chosen, q_rejected, "q_rejected", "q_chosen")
    margin = checks.real("margin", margin, low=0.0)
    return F.relu(margin - (q_chosen - q_rejected)).mean()


def _per_probe(x: Tensor) -> Tensor:
    """[S, ...] per-example values -> [S] means (one per stacked probe)."""
    return x.flatten(1).mean(1)


def _pairs_loss(fn: Callable) -> Callable:
    def loss(q: Tensor, r: Tensor, beta: float) -> Tensor:  # q, r: [S, b, 2]
        chosen = (r[..., 1] > r[..., 0]).long()[..., None]  # [S, b, 1]: column of the preferred item
        return _per_probe(fn(q.gather(-1, chosen).squeeze(-1), q.gather(-1, 1 - chosen).squeeze(-1)))
    return loss


# Each loss: (how an epoch is cut into examples, [S] losses of S stacked probes from their Q values
# and the rewards, both [S, ...]). "samples" sees samples one by one, "chunks" chunks of samples of
# one prompt, "pairs" one preference pair per row.
LOSSES: dict[str, tuple[str, Callable]] = {
    "mse": ("samples", lambda q, r, beta: _per_probe((q - r) ** 2)),
    "ce": ("samples", lambda q, r, beta: _per_probe(F.binary_cross_entropy_with_logits(q, r, reduction="none"))),
    "pg": ("chunks", lambda q, r, beta: _per_probe(-(_weights(q, beta) * r).sum(-1))),
    "bt": ("pairs", _pairs_loss(lambda qc, qr: -F.logsigmoid(qc - qr))),
    "hinge": ("pairs", _pairs_loss(lambda qc, qr: F.relu(0.1 - (qc - qr)))),
}


def _linears(probe: QProbe) -> list[nn.Linear]:
    """The probe's linear maps, input to output."""
    return [probe.net] if isinstance(probe.net, nn.Linear) else [m for m in probe.net if isinstance(m, nn.Linear)]


class _Stacked(nn.Module):
    """S copies of one QProbe trained side by side: layer weights [S, out, in], biases [S, out]."""

    def __init__(self, probe: QProbe, S: int):
        super().__init__()
        layers = _linears(probe)
        self.w = nn.ParameterList([nn.Parameter(m.weight.detach().expand(S, -1, -1).clone()) for m in layers])
        self.b = nn.ParameterList([nn.Parameter(m.bias.detach().expand(S, -1).clone()) for m in layers])

    def forward(self, f: Tensor) -> Tensor:
        """[S, ..., d] -> [S, ...]: probe s applied to f[s]."""
        x = f.reshape(f.shape[0], -1, f.shape[-1])  # [S, N, d]
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            x = torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))
            x = torch.relu(x) if i < len(self.w) - 1 else x
        return x.reshape(f.shape[:-1])

    def unstack(self, probe: QProbe, s: int) -> QProbe:
        """``probe`` (a copy of the stacked architecture) loaded with the weights of probe s."""
        with torch.no_grad():
            for m, w, b in zip(_linears(probe), self.w, self.b):
                m.weight.copy_(w[s]), m.bias.copy_(b[s])
        return probe.eval()


class ProbeFit(NamedTuple):
    """A trained probe (eval mode) and the mean training loss of every epoch."""

    probe: QProbe
    curve: list[float]


def train_probe(features: Tensor, rewards: Tensor, loss: str = "pg", beta: float = 1.0, chunk_size: int = 10,
                epochs: int = 150, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 1000,
                hidden: Sequence[int] = (), seed: int = 0, device: torch.device | str | None = None) -> ProbeFit:
    r"""Train a Q-probe with AdamW on frozen features.

    ``loss="mse"``/``"ce"`` see samples one by one (batches of ``batch_size`` samples);
    ``loss="pg"`` sees chunks of ``chunk_size`` samples of the same prompt, reshuffled every epoch
    (batches of ``batch_size // chunk_size`` chunks); ``"bt"``/``"hinge"`` see one preference pair
    per row, the preferred item being the one with the larger reward.

    Args:
        features: [P, n, d] features of n samples for each of P prompts ([P, 2, d] for pairs).
        rewards: [P, n] rewards ([P, 2] preference labels, unequal within a row, for pairs).
        loss: a key of :data:`LOSSES`.
        beta: training temperature of ``"pg"``, > 0.
        chunk_size: samples per chunk for ``"pg"``, 2 <= chunk_size <= n.
        hidden: MLP hidden widths (``()``: the linear probe).
        seed: initialisation and shuffling seed.
        device: where to train (default: the features' device); features and rewards are copied
            there, from any device.

    Returns:
        :class:`ProbeFit`: the probe (in eval mode, on ``device``) and the loss curve.
    """
    checks.tensor("features", features, dims=3, floating=True)
    return train_probes(features[None], rewards, loss, beta, chunk_size, epochs, lr, weight_decay, batch_size,
                        hidden, seed, device)[0]


def train_probes(features: Tensor, rewards: Tensor, loss: str = "pg", beta: float = 1.0, chunk_size: int = 10,
                 epochs: int = 150, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 1000,
                 hidden: Sequence[int] = (), seed: int = 0,
                 device: torch.device | str | None = None) -> list[ProbeFit]:
    r"""S probes at once, one per feature set of ``features`` [S, P, n, d] (e.g. every layer of a
    model), on the same rewards: each equals :func:`train_probe` on its features (same
    initialisation, same batches; AdamW acts elementwise, so the probes do not interact), up to
    float rounding, in about the time of one. Arguments as :func:`train_probe`.
    """
    kind, step_loss = LOSSES[checks.choice("loss", loss, LOSSES)]
    checks.tensor("features", features, dims=4, floating=True)
    checks.tensor("rewards", rewards, dims=2)
    if rewards.shape != features.shape[1:3]:
        raise ValueError(f"rewards must have shape {tuple(features.shape[1:3])} (features' [P, n]), "
                         f"got {tuple(rewards.shape)}")
    if min(features.shape[:3]) < 1:
        raise ValueError(f"features must hold at least one sample, got shape {tuple(features.shape)}")
    checks.finite("features", features)
    checks.finite("rewards", rewards.float())
    if loss == "ce":
        _unit_interval("rewards", rewards)
    beta = checks.beta(beta)
    epochs = checks.integer("epochs", epochs, low=1)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    lr = checks.real("lr", lr, low=0.0, low_open=True)
    weight_decay = checks.real("weight_decay", weight_decay, low=0.0)
    if kind == "chunks":
        chunk_size = checks.integer("chunk_size", chunk_size, low=2, high=features.shape[2])
    if kind == "pairs" and (features.shape[2] != 2 or bool((rewards[:, 0] == rewards[:, 1]).any())):
        raise ValueError(f"loss={loss!r} needs features [P, 2, d] and rewards [P, 2] with unequal entries")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device, a string or None, got {type(device).__name__}")
    try:
        device = torch.device(device) if device is not None else features.device
    except RuntimeError as e:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda', ...), got {device!r}") from e
    S, P, n, d = features.shape
    features, rewards = features.to(device, torch.float32), rewards.to(device, torch.float32)
    torch.manual_seed(seed := checks.integer("seed", seed, low=-(2**63), high=2**63 - 1))
    template = QProbe(d, hidden).to(device)  # every probe starts from this one's weights
    stacked = _Stacked(template, S)
    opt = torch.optim.AdamW(stacked.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)  # CPU shuffles, so every device sees the same batches
    per_batch = max(1, batch_size // chunk_size) if kind == "chunks" else batch_size
    curve = []
    for _ in range(epochs):
        if kind == "chunks":
            perm = torch.argsort(torch.rand(P, n, generator=g), dim=1).to(device)  # reshuffle within prompts
            m = (n // chunk_size) * chunk_size
            f = features.gather(2, perm[None, :, :m, None].expand(S, -1, -1, d)).reshape(S, -1, chunk_size, d)
            r = rewards.gather(1, perm[:, :m]).reshape(-1, chunk_size)
        elif kind == "pairs":
            f, r = features, rewards  # [S, P, 2, d], [P, 2]
        else:
            f, r = features.reshape(S, -1, d), rewards.reshape(-1)  # [S, P*n, d], [P*n]
        order = torch.randperm(f.shape[1], generator=g).to(device)  # drawn on the CPU: same on every device
        total = torch.zeros(S, device=device)
        n_batches = 0
        for s in range(0, f.shape[1], per_batch):
            rows = order[s : s + per_batch]
            rb = r[rows]
            value = step_loss(stacked(f[:, rows]), rb.expand(S, *rb.shape), beta)  # [S]
            opt.zero_grad(set_to_none=True)
            value.sum().backward()  # the probes' parameters are disjoint: each gets its own gradient
            opt.step()
            total, n_batches = total + value.detach(), n_batches + 1
        curve.append(total / n_batches)
    curves = torch.stack(curve).T.tolist()  # [S][epochs]; one host sync, at the end
    if not all(map(math.isfinite, curves[-1])):
        raise ValueError("training diverged (a non-finite loss): standardize the features or lower lr")
    # copies of the template: no new initialisation, so the global generator is left as one probe's init leaves it
    return [ProbeFit(stacked.unstack(copy.deepcopy(template), i), curves[i]) for i in range(S)]


def chunk_expected_reward(q: Tensor, rewards: Tensor, k: int, beta: float) -> Tensor:
    r"""Mean of sum_i p_i r_i over the disjoint chunks of k of each prompt's n samples (the paper's
    evaluation of the softmax-over-k sampler).

    Args:
        q, rewards: [P, n] on one device; the first (n // k)·k samples are used.
        k: candidates per selection, 1 <= k <= n.
        beta: selection temperature, >= 0.

    Returns:
        [P] the expected reward of the softmax-over-k sampler for each prompt.
    """
    checks.tensor("q", q, dims=2, floating=True)
    q, rewards = _pair(q, rewards)
    k = checks.integer("k", k, low=1, high=q.shape[-1])
    P, n = q.shape
    m = (n // k) * k
    return expected_value(q[:, :m].reshape(P, -1, k), rewards[:, :m].reshape(P, -1, k), beta).mean(-1)
