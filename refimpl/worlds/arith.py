r"""The column-addition world: a task world in the Q-Probe paper's regime.

A prompt is a sum of two or three numbers below 100, written digit by digit in two columns (zero-padded, like
a fixed-width register); the completion is the sum's three digits written **units first** -- the order in
which column addition produces them -- and the stop token::

    prompt      4 7 + 8 5 + 0 3 =          (47 + 85 + 3)
    completion  5 3 1 ;                    (135, units first)

The reward is 1 if the digits spell the true sum (:func:`reward`, a whitelist parser; nothing is ever
evaluated). The base model is pretrained on a corpus (:mod:`refimpl.worlds.writer`) written by a fallible
*writer* who adds column by column and forgets carries, more often in some columns than in others, and who
"carries the one" when a column's carry is two or more. A corpus line ends with the checker's verdict on the
writer's answer, after the stop token (every line, or a share ``WorldConfig.verdict_fraction`` of them)::

    <bos> 4 7 + 8 5 + 0 3 = 5 3 1 ; Y <eos>
    <bos> 4 7 + 8 5 + 0 3 = 5 2 0 ; N <eos>

Sampling stops at ``;``, so the verdict is never generated. How often a prompt is solved is set by the prompt
itself (:func:`refimpl.worlds.writer.writer_accuracy`: which columns carry, and how long they are), from
always (no carry) to almost never (a carry of two, or a carry into the leading digit). A tenth of the corpus
is subtraction (``7 3 - 2 8 =``), with its own classic bugs (forgotten borrows, "smaller from larger"): the
held-out *shifted* prompt set, as HumanEval is to MBPP.

Why units first: written most-significant-digit first, the first digit needs the whole carry chain, and a
0.3M-parameter model does not learn that in a minute of CPU; units first, each digit needs only its column and
the carry just written (Lee et al. 2023, "Teaching arithmetic to small transformers"). Why two-digit columns:
with fixed positions the model aligns columns by position.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import numbers
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .. import checks, lm

__all__ = ["WorldConfig", "STOP", "build_tokenizer", "draw_problem", "prompt_text", "answer_text",
           "value", "is_held_out", "prompt_set", "prompts", "SPLITS", "SPLIT_SIZES", "parse_answer", "reward", "hidden_score",
           "preference_label", "verdict_probability", "verdict_from_hidden", "MAX_NEW_TOKENS"]

STOP = ";"  # generation stops here; the verdict that follows in the corpus is never sampled
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
SYMBOLS = ["=", "+", "-", STOP, "Y", "N"]
DIGITS = [str(d) for d in range(10)]
WIDTH = 2  # digits per operand (zero-padded); answers have WIDTH + 1 digits
MAX_NEW_TOKENS = WIDTH + 2  # the answer's digits and the stop token
MAX_OPERANDS = 10  # ten numbers below 100 sum to at most 990: the answer keeps WIDTH + 1 digits


@dataclass(frozen=True)
class WorldConfig:
    """The world's parameters: they define the corpus, hence the model."""

    operands: tuple[int, int] = (2, 3)  # addition: number of operands, uniform in [lo, hi]
    # The writer forgets an incoming carry of 1 with a probability set by the column: the leading
    # column (no digits: the carry *is* the digit), a column with one or two nonzero digits, with three.
    p_forget_leading: float = 0.95
    p_forget_short: tuple[float, float] = (0.7, 0.6)  # one, two nonzero digits
    p_forget_long: float = 0.9  # three nonzero digits
    p_carry_the_one: float = 0.99  # a carry of 2 or more is written as 1
    subtraction_share: float = 0.1  # share of corpus lines that are subtractions a - b (a >= b)
    p_forget_borrow: float = 0.3  # subtraction: an incoming borrow is forgotten
    p_smaller_from_larger: float = 0.7  # subtraction: a column that needs a borrow is done as |x - y|
    verdict: bool = True  # end corpus lines with the checker's verdict
    verdict_fraction: float = 1.0  # the chance that a line carries it (drawn per line when strictly between 0 and 1)
    held_out_mod: int = 5  # a prompt is held out (test / shifted) iff its hash is 0 mod this (>= 2)

    def __post_init__(self):
        """Checked, canonical fields: probabilities in [0, 1], 2 <= lo <= hi <= MAX_OPERANDS operands."""
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (a frozen dataclass)
        lo, hi = (checks.integer("operands", n, low=2, high=MAX_OPERANDS) for n in checks.pair("operands", self.operands))
        if lo > hi:
            raise ValueError(f"operands must be (lo, hi) with lo <= hi, got {self.operands!r}")
        put("operands", (lo, hi))
        put("p_forget_short", tuple(checks.probability("p_forget_short", p) for p in checks.pair("p_forget_short", self.p_forget_short)))
        for name in ("p_forget_leading", "p_forget_long", "p_carry_the_one", "subtraction_share", "p_forget_borrow",
                     "p_smaller_from_larger", "verdict_fraction"):
            put(name, checks.probability(name, getattr(self, name)))
        put("verdict", checks.boolean("verdict", self.verdict))
        if not self.verdict and self.verdict_fraction != 1:  # no verdicts at all: the fraction stays at its default
            raise ValueError(f"verdict_fraction must stay 1.0 when verdict is False, got {self.verdict_fraction!r}")
        put("held_out_mod", checks.integer("held_out_mod", self.held_out_mod, low=2))  # 1: every prompt held out


# --- tokenizer ------------------------------------------------------------------------------------

def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast``: one token per digit and symbol; adds ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS + DIGITS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])  # no token_type_ids


# --- problems -------------------------------------------------------------------------------------

def _number(rng: random.Random) -> int:
    """One or two digits, equally likely; then uniform."""
    return rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99)


def check_problem(problem) -> tuple:
    """``problem`` if it is ``("+", x_1, ..., x_m)`` (2 <= m <= MAX_OPERANDS) or ``("-", a, b)`` with
    a >= b, every number an int in [0, 99]; raises ``TypeError``/``ValueError`` naming it otherwise."""
    if not isinstance(problem, tuple) or not problem or problem[0] not in ("+", "-") or any(
            isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in problem[1:]):
        raise TypeError(f"problem must be a tuple ('+', x_1, ...) or ('-', a, b) of int operands, got {problem!r}")
    op, *xs = problem
    if not all(0 <= x < 10**WIDTH for x in xs) or not 2 <= len(xs) <= MAX_OPERANDS or op == "-" and (
            len(xs) != 2 or xs[0] < xs[1]):
        raise ValueError(f"problem must be ('+', x_1..x_m), 2 <= m <= {MAX_OPERANDS}, or ('-', a, b), a >= b, numbers "
                         f"in [0, {10**WIDTH - 1}], got {problem!r}")
    return problem


def draw_problem(rng: random.Random, kind: str, cfg: WorldConfig = WorldConfig()) -> tuple:
    """A random problem of ``kind`` "add" (2-3 operands) or "sub" (a - b, a >= b)."""
    checks.instance("rng", rng, random.Random), checks.instance("cfg", cfg, WorldConfig)
    if kind == "sub":
        a, b = _number(rng), _number(rng)
        return ("-", max(a, b), min(a, b))
    if kind == "add":
        return ("+",) + tuple(_number(rng) for _ in range(rng.randint(*cfg.operands)))
    raise ValueError(f"kind must be 'add' or 'sub', got {kind!r}")


def value(problem: tuple) -> int:
    """The true value of a problem (the trusted generator's answer)."""
    op, *xs = check_problem(problem)
    return xs[0] - xs[1] if op == "-" else sum(xs)


def _digits(v: int, n: int) -> list[int]:
    """The n lowest digits of v, units first."""
    return [(v // 10**j) % 10 for j in range(n)]


def prompt_text(problem: tuple) -> str:
    """``("+", 47, 85, 3)`` -> ``"4 7 + 8 5 + 0 3 ="``."""
    op, *xs = check_problem(problem)
    return f" {op} ".join(" ".join(str(d) for d in reversed(_digits(x, WIDTH))) for x in xs) + " ="


def answer_text(v: int) -> str:
    """``135`` -> ``"5 3 1"``: WIDTH + 1 digits, units first (0 <= v < 10^(WIDTH + 1))."""
    v = checks.integer("v", v, low=0, high=10 ** (WIDTH + 1) - 1)
    return " ".join(str(d) for d in _digits(v, WIDTH + 1))


def is_held_out(problem: tuple, cfg: WorldConfig = WorldConfig()) -> bool:
    """Deterministic split by a hash of the prompt text: held-out prompts never enter the corpus."""
    return _held_out(check_problem(problem), checks.instance("cfg", cfg, WorldConfig).held_out_mod)


def _held_out(problem: tuple, mod: int) -> bool:
    h = hashlib.sha256(prompt_text(problem).encode()).digest()
    return int.from_bytes(h[:4], "big") % mod == 0


@functools.lru_cache(maxsize=None)
def _n_distinct(kind: str, m: int, held: bool, mod: int) -> int:
    """How many distinct problems of ``kind`` ("sub", or "add" with m operands) are (not) held out."""
    if kind == "sub":
        return sum(_held_out(("-", a, b), mod) == held for a in range(100) for b in range(a + 1))
    return 10**12 if m > 3 else sum(  # 100^m problems with m > 3: never exhausted in practice (nor countable)
        _held_out(("+",) + xs, mod) == held for xs in itertools.product(range(100), repeat=m))


SPLIT_SEEDS = {"train": 11, "test": 22, "shifted": 33}
SPLITS = ("train", "val", "test", "shifted")
SPLIT_SIZES = {"train": 200, "val": 100, "test": 100, "shifted": 100}  # the chapters' prompt sets


def prompt_set(split: str, n: int, cfg: WorldConfig = WorldConfig()) -> tuple[list[str], list[int], list[tuple]]:
    """``n`` distinct prompts, their true values and problems, deterministically.

    "train": additions outside the held-out bucket (for probes and policies; the corpus may contain them);
    "test": held-out additions; "shifted": held-out subtractions; "val": held-out additions on which every
    choice (a hyperparameter, β, k, a stopping step) is made, so that "test" is used once. "val" continues the
    test split's own sequence after its first ``SPLIT_SIZES["test"]`` prompts: drawn exactly like them and never
    among them (the test split asked for more than ``SPLIT_SIZES["test"]`` prompts runs into "val"). Only 19
    held-out sums of two one-digit numbers exist, and the test prompts hold 13 of them, so "val" has fewer of
    these always-solved prompts than "test". An ``n`` beyond the split's distinct prompts raises ``ValueError``.
    """
    split = checks.choice("split", split, SPLITS)
    n = checks.integer("n", n, low=0)
    cfg = checks.instance("cfg", cfg, WorldConfig)
    if split == "val":
        skip = SPLIT_SIZES["test"]
        texts, values, problems = prompt_set("test", skip + n, cfg)
        return texts[skip:], values[skip:], problems[skip:]
    rng = random.Random(SPLIT_SEEDS[split])
    kind, held = ("sub", True) if split == "shifted" else ("add", split == "test")
    available = 0  # distinct prompts, counted (once, cached) only as far as n needs
    for m in [2] if kind == "sub" else range(cfg.operands[0], cfg.operands[1] + 1):
        available += _n_distinct(kind, m, held, cfg.held_out_mod) if available < n else 0
    if n > available:
        raise ValueError(f"n={n} exceeds the {available} distinct prompts of split {split!r} under this cfg")
    seen, problems = set(), []
    while len(problems) < n:
        p = draw_problem(rng, kind, cfg)
        if _held_out(p, cfg.held_out_mod) == held and p not in seen:
            seen.add(p)
            problems.append(p)
    return [prompt_text(p) for p in problems], [value(p) for p in problems], problems


def prompts(split: str = "test", n: int | None = None, cfg: WorldConfig = WorldConfig()) -> tuple[list[str], list[int]]:
    """(prompt texts, true values) of a split: :func:`prompt_set` with the chapters' sizes
    (``SPLIT_SIZES``; the first n of the same sequence when ``n`` is smaller)."""
    split = checks.choice("split", split, SPLITS)
    texts, values, _ = prompt_set(split, SPLIT_SIZES[split] if n is None else n, cfg)
    return texts, values


# --- reward ---------------------------------------------------------------------------------------

def parse_answer(text: str) -> int | None:
    """The number a completion spells, or ``None`` if it is malformed.

    A completion is 1 to WIDTH + 1 single ASCII digits separated by whitespace, units first, optionally followed
    by the stop token: ``"5 3 1"``, ``"5 3 1 ;"``. Anything else is malformed. Never evaluates anything.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    toks = text.split()
    if toks and toks[-1] == STOP:
        toks = toks[:-1]
    if not 1 <= len(toks) <= WIDTH + 1 or any(t not in DIGITS for t in toks):
        return None
    return sum(int(t) * 10**j for j, t in enumerate(toks))


def _texts_targets(texts, targets) -> tuple[list[str], list[int]]:
    """Checked (texts, targets): a list of strings and as many integer targets (a 1-D tensor,
    NumPy integers and Python ints all accepted)."""
    texts = checks.strings("texts", texts, allow_empty=True)
    if isinstance(targets, Tensor):
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(f"targets must be a 1-D integer tensor, got shape {tuple(targets.shape)}, {targets.dtype}")
        targets = targets.tolist()
    targets = list(targets)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in targets):
        raise TypeError("targets must be integers")
    if len(texts) != len(targets):
        raise ValueError(f"texts has {len(texts)} entries but targets has {len(targets)}")
    return texts, [int(t) for t in targets]


def reward(texts: Sequence[str], targets: Sequence[int] | Tensor, device=None) -> Tensor:
    """r(x, y) = 1 if completion ``texts[i]`` spells ``targets[i]``, else 0 ([B] float32)."""
    texts, targets = _texts_targets(texts, targets)
    return torch.tensor([1.0 if parse_answer(y) == t else 0.0 for y, t in zip(texts, targets)],
                        dtype=torch.float32, device=device)


def hidden_score(texts: Sequence[str], targets: Sequence[int] | Tensor, device=None) -> Tensor:
    """The preference variant's graded quality: the number of answer digits (units first) that
    match the true sum's, 0..WIDTH + 1, or -1 if malformed ([B] float32). A near miss (one
    forgotten carry) beats a far miss; :func:`reward` is 1 exactly when the score is WIDTH + 1."""
    texts, targets = _texts_targets(texts, targets)
    out = [-1.0 if v is None else float(sum(a == b for a, b in zip(_digits(v, WIDTH + 1), _digits(t, WIDTH + 1))))
           for v, t in zip(map(parse_answer, texts), targets)]
    return torch.tensor(out, dtype=torch.float32, device=device)


def preference_label(score_a: Tensor, score_b: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Bradley-Terry labels: 1 where a is preferred, drawn with P(a > b) = sigmoid(s_a - s_b) ([n] float, on
    the scores' device; the uniforms are drawn on the generator's and moved there)."""
    checks.same_device(score_a=score_a, score_b=score_b)
    checks.same_shape(score_a=checks.tensor("score_a", score_a, floating=True),
                      score_b=checks.tensor("score_b", score_b, floating=True))
    checks.finite("score_a", score_a), checks.finite("score_b", score_b), checks.generator("generator", generator)
    p = torch.sigmoid(score_a - score_b)
    u = torch.rand(p.shape, generator=generator, device=p.device if generator is None else generator.device)
    return (u.to(p.device) < p).float()


@torch.no_grad()
def verdict_probability(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor,
                        completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """The model's own verdict P(Y | x, y) / (P(Y | x, y) + P(N | x, y)) read after the last
    completion token (the stop token). Returns [B] probabilities."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("Y", "N")]
    logits = lm.forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits
    last = prompt_ids.shape[1] - 1 + completion_mask.long().sum(1)  # [B] the stop token's position
    logits = logits[torch.arange(logits.shape[0], device=logits.device), last][:, ids].float()
    return torch.softmax(logits, -1)[:, 0]


@torch.no_grad()
def verdict_from_hidden(model, tokenizer, hidden: Tensor) -> Tensor:
    """:func:`verdict_probability` from the final (post-norm) hidden state at the stop token, which ``lm.embed_layers``
    returns at position 0 and depth -1: the LM head restricted to Y and N, so a pool that embeds its samples
    gets the verdict without another forward pass. hidden: [B, d] (moved to the head's device and dtype).
    Returns [B] probabilities."""
    head = model.get_output_embeddings()
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("Y", "N")]
    if not isinstance(hidden, Tensor) or hidden.dim() != 2 or hidden.shape[1] != head.weight.shape[1]:
        raise ValueError(f"hidden must be a [B, {head.weight.shape[1]}] tensor of final hidden states")
    logits = hidden.to(head.weight) @ head.weight[ids].T  # [B, 2]
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    return torch.softmax(logits.float(), -1)[:, 0]
