r"""Prefix-dependent banned sets B(x, y_<t) for (G)I-DLE, SMC and rejection sampling.

(G)I-DLE (Lee 2025, arXiv 2503.18050) samples Q(y_t) = P(y_t | y_<t) 1[y_t ∉ B] / Z_t with
Z_t = Σ_{j ∉ B} P(j | y_<t); here B may depend on the prefix. A :class:`Constraint` keeps a state
row per sequence: ``start(prompt_ids)``, ``advance(state, tokens)`` per token, ``banned(state, V,
device)`` = the [N, V] mask of B. Fixed sets (:class:`BannedTokens`), multi-token bad words
(:class:`BadWords`, as ``transformers``' ``NoBadWordsLogitsProcessor`` but keeping a ban on the stop
token, which transformers drops), byte-level automata (:class:`Automaton`) and, built on one, the
UTF-8 script ban for byte-level BPE (GPT-2, Qwen2), where one character spans several tokens::

    from refimpl import constraints, idle, lm   # model, tokenizer: e.g. Qwen/Qwen2.5-1.5B-Instruct
    ban = constraints.script_ban(tokenizer, constraints.CJK_IDEOGRAPHS)  # no Chinese in Korean
    s = lm.sample(model, tokenizer, prompts, k=4, max_new_tokens=256,
                  logits_processor=[idle.IDLELogitsProcessor(ban)])
    c = idle.corrected_sample(model, tokenizer, prompts, ban, k=8)  # ~ P(y | no CJK), by SIR
"""
from __future__ import annotations

import re
from typing import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import checks, lm

__all__ = ["Constraint", "BannedTokens", "BadWords", "Automaton", "as_constraint",
           "iter_banned", "violations", "token_bytes", "Utf8Ban", "script_ban", "CJK_IDEOGRAPHS"]

CJK_IDEOGRAPHS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))


class Constraint:
    """A banned set B(y_<t) that depends on the prefix through a per-row state tensor [N, ...]."""

    def start(self, prompt_ids: Tensor) -> Tensor:  # state after the prompts [N, P] (as generate sees them)
        raise NotImplementedError

    def advance(self, state: Tensor, tokens: Tensor) -> Tensor:  # state after appending tokens [N]
        raise NotImplementedError

    def banned(self, state: Tensor, vocab_size: int, device) -> Tensor:  # [N, V] bool, True on B
        raise NotImplementedError

    def dead(self, state: Tensor) -> Tensor:  # [N] bool: the prefix already took a banned token
        return torch.zeros(state.shape[0], dtype=torch.bool)


class BannedTokens(Constraint):
    """A fixed banned set B (no state: [N, 0])."""

    def __init__(self, banned_ids, name: str = "banned_ids"):
        self.ids = checks.token_ids(name, banned_ids)
        self._masks: dict[tuple, Tensor] = {}

    def start(self, prompt_ids):
        return prompt_ids.new_zeros(prompt_ids.shape[0], 0)

    def advance(self, state, tokens):
        return state

    def banned(self, state, vocab_size, device):
        if (vocab_size, str(device)) not in self._masks:
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[list(checks.token_ids("banned_ids", self.ids, vocab_size))] = True
            self._masks[vocab_size, str(device)] = mask.to(device)
        return self._masks[vocab_size, str(device)].expand(state.shape[0], vocab_size)


def as_constraint(value, name: str = "banned_ids") -> Constraint:
    """A :class:`Constraint` as is; token ids (ints, NumPy ints, an integer tensor) as :class:`BannedTokens`."""
    return value if isinstance(value, Constraint) else BannedTokens(value, name)


class BadWords(Constraint):
    """Ban the last token of a bad word whenever its other tokens end the context (prompt included).
    State: the last m = (longest word - 1) tokens of the context [N, m], -1 where it is shorter."""

    def __init__(self, bad_words: Sequence[Sequence[int]]):
        if isinstance(bad_words, (str, bytes, Tensor)) or not isinstance(bad_words, Sequence):
            raise TypeError(f"bad_words must be a list of token-id lists, got {type(bad_words).__name__}")
        if not bad_words:
            raise ValueError("bad_words must not be empty")
        words = []
        for i, w in enumerate(bad_words):
            if isinstance(w, (str, bytes)) or not isinstance(w, Sequence) or not len(w):
                raise TypeError(f"bad_words[{i}] must be a non-empty list of token ids, got {w!r}")
            words.append(tuple(checks.integer(f"bad_words[{i}]", t, low=0) for t in w))
        self.words = tuple(dict.fromkeys(words))
        self.m = max(len(w) for w in self.words) - 1

    def start(self, prompt_ids):
        ctx = torch.nn.functional.pad(prompt_ids.long(), (self.m, 0), value=-1)
        return ctx[:, ctx.shape[1] - self.m:]

    def advance(self, state, tokens):
        return torch.cat([state, tokens.long().to(state.device)[:, None]], 1)[:, 1:]

    def banned(self, state, vocab_size, device):
        checks.token_ids("bad_words", [t for w in self.words for t in w], vocab_size)
        state, mask = state.to(device), torch.zeros(state.shape[0], vocab_size, dtype=torch.bool, device=device)
        for w in self.words:  # the word's prefix (length n) ends the context -> its last token is banned
            n = len(w) - 1
            mask[:, w[-1]] |= (state[:, self.m - n:] == torch.tensor(w[:-1], device=device, dtype=torch.long)).all(-1)
        return mask


class Automaton(Constraint):
    r"""A DFA over bytes lifted to tokens: ``step(state, byte)`` gives the next (hashable) state or
    ``None`` (dead). A token is banned in state s when its bytes lead from s to the dead state;
    special tokens (``None`` bytes) and ids past ``token_bytes`` leave the state unchanged. The
    automaton reads the completion only (it is in ``initial`` after the prompt).
    State tensor: [N] long ids of interned states (-1: dead, after a banned token)."""

    def __init__(self, step: Callable[[Hashable, int], Hashable | None], initial: Hashable,
                 token_bytes: Sequence[bytes | None]):
        if not callable(step):
            raise TypeError(f"step must be callable, got {type(step).__name__}")
        if isinstance(token_bytes, (str, bytes)) or not isinstance(token_bytes, Sequence) or \
                not all(b is None or isinstance(b, bytes) for b in token_bytes):
            raise TypeError("token_bytes must be a sequence of bytes (or None for special tokens), one per token")
        self.step, self.V = step, len(token_bytes)
        lengths = np.array([len(b or b"") for b in token_bytes], dtype=np.int64)
        self._order = np.argsort(-lengths, kind="stable")  # longest first: active tokens are a prefix
        self._len = lengths[self._order]
        self._offset = np.concatenate([[0], np.cumsum(self._len)[:-1]]).astype(np.int64)
        self._flat = np.frombuffer(b"".join(token_bytes[i] or b"" for i in self._order), np.uint8).astype(np.int64)
        self._states, self._ids, self._masks = [], {}, {}
        self._tables: dict[int, np.ndarray] = {}  # state id -> [V] next state id (-1: banned)
        self._memo: dict[int, int] = {}  # state id * 256 + byte -> next state id
        self.initial = self._intern(initial)

    def _intern(self, state) -> int:
        if state is not None and state not in self._ids:
            self._ids[state] = len(self._states)
            self._states.append(state)
        return -1 if state is None else self._ids[state]

    def _next(self, key: int) -> int:
        if key not in self._memo:
            self._memo[key] = self._intern(self.step(self._states[key // 256], key % 256))
        return self._memo[key]

    def table(self, s: int) -> np.ndarray:
        """[V] next-state id of each token from state id ``s`` (-1: banned), built once."""
        if s not in self._tables:
            cur = np.full(self.V, s, dtype=np.int64)  # tokens in length order
            for d in range(int(self._len[0]) if self.V else 0):
                n = int(np.searchsorted(-self._len, -d, side="left"))  # tokens longer than d
                c = cur[:n]  # a view
                live = c >= 0
                keys = c[live] * 256 + self._flat[self._offset[:n][live] + d]
                uniq, inv = np.unique(keys, return_inverse=True)
                c[live] = np.array([self._next(int(k)) for k in uniq], dtype=np.int64)[inv]
            self._tables[s] = np.empty(self.V, dtype=np.int64)
            self._tables[s][self._order] = cur
        return self._tables[s]

    def start(self, prompt_ids):
        return torch.full((prompt_ids.shape[0],), self.initial, dtype=torch.long)

    def advance(self, state, tokens):
        tok = tokens.long().cpu().numpy()
        out = np.full(len(tok), -1, dtype=np.int64)
        st = state.cpu().numpy()
        for s in np.unique(st[st >= 0]):
            rows = (st == s) & (tok < self.V)
            out[rows] = self.table(int(s))[tok[rows]]
            out[(st == s) & (tok >= self.V)] = s  # ids past the tokenizer's: no bytes
        return torch.from_numpy(out)

    def dead(self, state):
        return state.cpu() < 0

    def banned(self, state, vocab_size, device):
        st = state.cpu()
        uniq, inv = torch.unique(st, return_inverse=True)
        for s in uniq.tolist():
            if (s, vocab_size, str(device)) not in self._masks:
                m = torch.full((vocab_size,), s < 0)  # the dead state bans everything
                n = min(vocab_size, self.V)
                m[:n] = torch.from_numpy(self.table(s)[:n] < 0) if s >= 0 else True
                self._masks[s, vocab_size, str(device)] = m.to(device)
        return torch.stack([self._masks[s, vocab_size, str(device)] for s in uniq.tolist()])[inv.to(device)]


def iter_banned(constraint: Constraint, prompt_ids: Tensor, completion_ids: Tensor,
                vocab_size: int) -> Iterator[Tensor]:
    """The masks [N, V] of B(x, y_<t) for t = 0 .. T-1 along given completions [N, T] (on the prompts' device).

    ``prompt_ids`` [N, P] as ``generate`` sees them (left-padded; see :func:`refimpl.lm.left_align`)."""
    checks.instance("constraint", constraint, Constraint)
    checks.same_device(prompt_ids=prompt_ids, completion_ids=completion_ids)
    checks.tensor("prompt_ids", prompt_ids, dims=2, integral=True)
    checks.tensor("completion_ids", completion_ids, dims=2, integral=True)
    vocab_size = checks.integer("vocab_size", vocab_size, low=1)
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows but completion_ids has {completion_ids.shape[0]}")
    return _iter_banned(constraint, prompt_ids, completion_ids, vocab_size)


def _iter_banned(constraint, prompt_ids, completion_ids, vocab_size):
    state = constraint.start(prompt_ids)
    for t in range(completion_ids.shape[1]):
        yield constraint.banned(state, vocab_size, completion_ids.device)
        state = constraint.advance(state, completion_ids[:, t])


def violations(constraint, prompt_ids: Tensor, completion_ids: Tensor, completion_mask: Tensor,
               vocab_size: int, prompt_mask: Tensor | None = None) -> Tensor:
    """[N] bool: whether some real completion token y_t lies in B(x, y_<t).

    ``prompt_ids`` [N, P] left-padded (as ``generate`` gives them), or any padding with its
    ``prompt_mask`` (the prompts are then left-aligned first); ``completion_ids`` [N, T] token ids
    in [0, vocab_size) with a 0/1 ``completion_mask`` [N, T]."""
    constraint = as_constraint(constraint, "constraint")
    checks.same_device(prompt_ids=prompt_ids, completion_ids=completion_ids, completion_mask=completion_mask,
                       prompt_mask=prompt_mask)
    checks.tensor("completion_ids", completion_ids, dims=2, integral=True)
    checks.tensor("completion_mask", completion_mask)
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_mask must have the shape of completion_ids {tuple(completion_ids.shape)}, "
                         f"got {tuple(completion_mask.shape)}")
    if bool(((completion_mask != 0) & (completion_mask != 1)).any()):
        raise ValueError("completion_mask must hold only 0 and 1")
    vocab_size = checks.integer("vocab_size", vocab_size, low=1)
    if bool(((completion_ids < 0) | (completion_ids >= vocab_size)).any()):
        raise ValueError(f"completion_ids must be token ids in [0, {vocab_size}) (vocab_size)")
    if prompt_mask is not None:
        prompt_ids, _ = lm.left_align(prompt_ids, prompt_mask)
    bad = torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device)
    for t, mask in enumerate(iter_banned(constraint, prompt_ids, completion_ids, vocab_size)):
        hit = mask.gather(1, completion_ids[:, t:t + 1]).squeeze(1)
        bad |= hit & completion_mask[:, t].bool()
    return bad


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token stands for (None for special and added tokens): byte-level BPE (GPT-2,
    Qwen2: a ``ByteLevel`` decoder) maps each character back to its byte; otherwise ``<0xHH>`` is
    byte HH and other tokens are their UTF-8 text with ``▁`` read as a space."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_level = "ByteLevel" in repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None))
    inv = {c: b for b, c in bytes_to_unicode().items()}  # GPT-2's printable stand-in character -> byte
    special = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    out = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None or i in special:
            out.append(None)
        elif byte_level:
            out.append(bytes(inv[c] for c in tok) if all(c in inv for c in tok) else tok.encode())
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(tok.replace("\u2581", " ").encode())
    return out


# UTF-8 well-formed sequences (Unicode Table 3-7): lead byte -> (length, allowed 2nd-byte range)
_LEAD = {**{b: (2, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, **{b: (3, 0x80, 0xBF) for b in range(0xE0, 0xF0)},
         **{b: (4, 0x80, 0xBF) for b in range(0xF0, 0xF5)}, 0xE0: (3, 0xA0, 0xBF), 0xED: (3, 0x80, 0x9F),
         0xF0: (4, 0x90, 0xBF), 0xF4: (4, 0x80, 0x8F)}


class Utf8Ban:
    r"""``step`` of a UTF-8 decoder (maximal-subpart U+FFFD replacement, like Python's and Rust's)
    that dies when a code point in ``ranges`` is produced, or when the pending partial character
    can only complete inside them. State: the pending bytes (a tuple, ``()`` at a boundary)."""

    def __init__(self, ranges: Sequence[tuple[int, int]]):
        if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence):
            raise TypeError(f"ranges must be a list of (low, high) code points, got {type(ranges).__name__}")
        rs = sorted((checks.integer("ranges", a, 0, 0x10FFFF), checks.integer("ranges", b, 0, 0x10FFFF))
                    for a, b in (checks.pair("ranges", r) for r in ranges))
        if not rs or any(a > b for a, b in rs):
            raise ValueError(f"ranges must be a non-empty list of (low, high) code points, low <= high, got {ranges!r}")
        self.ranges = tuple(rs)

    def _covered(self, lo: int, hi: int) -> bool:
        """Whether every code point in [lo, hi] is banned (the ranges are sorted by their start)."""
        for a, b in self.ranges:
            lo = b + 1 if a <= lo <= b else lo
        return lo > hi

    def _span(self, p: tuple) -> tuple[int, int]:
        """Smallest and largest code point a well-formed completion of the prefix p can give."""
        n, lo2, hi2 = _LEAD[p[0]]
        lo = p + ((lo2,) if len(p) == 1 else ()) + (0x80,) * (n - max(len(p), 2))
        hi = p + ((hi2,) if len(p) == 1 else ()) + (0xBF,) * (n - max(len(p), 2))
        return ord(bytes(lo).decode()), ord(bytes(hi).decode())

    def _char(self, cp: int):  # a complete character: the boundary state, or dead
        return None if self._covered(cp, cp) else ()

    def __call__(self, pending: tuple, b: int):
        if pending:
            n, lo2, hi2 = _LEAD[pending[0]]
            lo, hi = (lo2, hi2) if len(pending) == 1 else (0x80, 0xBF)
            if lo <= b <= hi:
                p = pending + (b,)
                return self._char(ord(bytes(p).decode())) if len(p) == n else (None if self._covered(*self._span(p)) else p)
            if self._char(0xFFFD) is None:  # the truncated character decodes to U+FFFD
                return None
        if b < 0x80:
            return self._char(b)
        if b in _LEAD:
            return None if self._covered(*self._span((b,))) else (b,)
        return self._char(0xFFFD)  # a stray continuation byte or an invalid lead byte


def script_ban(tokenizer, ranges: Sequence[tuple[int, int]] = CJK_IDEOGRAPHS) -> Automaton:
    """Ban every token that would complete (or commit to) a character whose code point lies in
    ``ranges``, given each row's pending partial UTF-8 character. Works with any tokenizer whose
    tokens map to bytes (see :func:`token_bytes`)."""
    return Automaton(Utf8Ban(ranges), (), token_bytes(tokenizer))
