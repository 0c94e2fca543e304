r"""Following a prefix-dependent constraint through the calls ``generate`` makes to a logits processor.

A logits processor sees only ``(input_ids, scores)``: no call says which rows continue which, or
where a generation starts. :class:`Tracker` recovers it from the ids themselves, so that a
:class:`refimpl.constraints.Constraint`'s state B(x, y_<t) is right in every decoding mode of
``transformers``: sampling and greedy decoding (one token per call, ``num_return_sequences`` rows
per prompt), beam search (rows reordered at every step) and assisted or speculative decoding (a
draft of several tokens verified in one call, calls that go back to a shorter prefix when a draft
is rejected, and the assistant's own ``generate`` calling the same processors; Leviathan et al.
2023, arXiv 2211.17192).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import checks
from .constraints import Constraint

__all__ = ["Tracker"]


class _Call:
    """The rows of one call: ids [N, L] (NumPy, on the host), their states [N, ...], and a lookup
    from a row's bytes to its index, built when first needed."""

    def __init__(self, ids: np.ndarray, state: Tensor, root: bool):
        self.ids, self.state, self.root, self._index = ids, state, root, None

    def find(self, key: bytes) -> int | None:
        if self._index is None:
            self._index = {r.tobytes(): i for i, r in enumerate(self.ids)}
        return self._index.get(key)


class Tracker:
    """Each row's constraint state across the calls of a logits processor, in every ``generate`` mode.

    A row continues the longest sequence seen before that is a prefix of it (a row of one of the last
    ``history`` calls, or a prompt of the generation): its state is that sequence's, advanced over the
    tokens added since. That is one token in sampling and greedy decoding (``num_return_sequences``
    rows per prompt included) and in beam search (rows reordered), and any number, zero included, in
    assisted and speculative decoding, whose calls go back to shorter prefixes after a rejected draft
    and are shared with the assistant's ``generate``. A row that extends nothing seen starts a
    generation with ``constraint.start(row)``. One tracker thus follows one generation at a time (and
    consecutive calls on new prompts): call :meth:`reset` before reusing it on prompts that extend an
    earlier output (a chat's next turn), which would otherwise read as a continuation of it.
    ``kind`` says how the last call relates to the one before: ``"new"`` (every row a prompt),
    ``"step"`` (the same rows in the same order, one token longer) or ``"other"``.
    """

    def __init__(self, constraint: Constraint, history: int = 16):
        self.constraint = checks.instance("constraint", constraint, Constraint)
        self.history = checks.integer("history", history, low=1)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence seen: the next call starts a generation."""
        self._calls: list[_Call] = []  # the generation's prompts (roots) and the recent calls, oldest first
        self.kind: str | None = None
        self.state: Tensor | None = None  # the last call's states [N, ...]

    def banned(self, input_ids: Tensor, vocab_size: int, device) -> Tensor:
        """[N, V] bool: B(y_<t) of each row of ``input_ids`` [N, L], its state updated as above."""
        return self.constraint.banned(self.update(input_ids), vocab_size, device)

    def _find(self, row: np.ndarray) -> tuple[Tensor, int] | None:
        """(state, length n) of the longest sequence seen that is a prefix of ``row``, else None."""
        for n in sorted({c.ids.shape[1] for c in self._calls if c.ids.shape[1] <= len(row)}, reverse=True):
            key = row[:n].tobytes()
            for c in reversed(self._calls):
                i = c.find(key) if c.ids.shape[1] == n else None
                if i is not None:
                    return c.state[i], n
        return None

    def update(self, input_ids: Tensor) -> Tensor:
        """The states [N, ...] of the rows of ``input_ids`` [N, L], remembered for the later calls."""
        if not isinstance(input_ids, Tensor):
            raise TypeError("input_ids must be a tensor: a prefix-dependent constraint reads the prefix")
        checks.tensor("input_ids", input_ids, dims=2, integral=True)
        ids, L = input_ids.detach().to("cpu", torch.long).numpy(), input_ids.shape[1]
        last = self._calls[-1] if self._calls else None
        if last is not None and last.ids.shape == (len(ids), L - 1) and bool((ids[:, :-1] == last.ids).all()):
            self.kind, new = "step", []
            state = self.constraint.advance(last.state, input_ids[:, -1])
        else:
            found = [self._find(r) for r in ids]
            new = [i for i, f in enumerate(found) if f is None]
            if len(new) == len(ids):  # nothing seen: a new generation
                self._calls = []
            rows: list = [None] * len(ids)
            if new:
                rows_new = self.constraint.start(input_ids[new])
                for j, i in enumerate(new):
                    rows[i] = rows_new[j]
            for n in sorted({f[1] for f in found if f is not None}):  # replay the tokens added since
                group = [i for i, f in enumerate(found) if f is not None and f[1] == n]
                st = torch.stack([found[i][0] for i in group])
                for t in range(n, L):
                    st = self.constraint.advance(st, input_ids[group, t])
                for j, i in enumerate(group):
                    rows[i] = st[j]
            state = torch.stack(rows)
            roots = {c.ids[i].tobytes() for c in self._calls if c.root for i in range(len(c.ids))}
            self.kind = "new" if all(f is None or (f[1] == L and r.tobytes() in roots)
                                     for f, r in zip(found, ids)) else "other"
        if new:
            self._calls.append(_Call(ids[new], state[new], root=True))
        self._calls.append(_Call(ids, state, root=False))
        recent = [c for c in self._calls if not c.root]
        if len(recent) > self.history:
            self._calls.remove(recent[0])
        self.state = state
        return state
