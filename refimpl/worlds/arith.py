r"""The arithmetic task world: the book's analogue of code generation with unit tests.

A prompt is a target number, ``"17 ="``; a completion is an expression that should evaluate to
it, ``"9 + 8 ;"``; the reward is 1 if it does and 0 otherwise (malformed text included).
The base model is pretrained on a synthetic corpus written by a fallible writer (right 70% of
the time on even first operands, 30% on odd ones, where it mostly slips by one), and every
line ends with a checker's verdict::

    <bos> 17 = 9 + 8 ; Y <eos>
    <bos> 17 = 20 - 2 ; N <eos>

Sampling stops at ``;``, so the verdict is never generated: like a code model that has seen
code followed by test output, the model has learned to *represent* correctness at the ``;``
token without being able to act on it. That is the signal a Q-probe reads.

The reward is computed by a whitelist parser (:func:`evaluate`): integers, ``+ - *`` and
parentheses, bounded in length, depth and magnitude. Model output is never ``eval``-ed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ArithConfig",
    "build_tokenizer",
    "corpus_line",
    "corpus",
    "prompts",
    "split_targets",
    "evaluate",
    "reward",
    "hidden_score",
    "preference_label",
    "STOP",
    "verdict_probability",
]

STOP = ";"  # generation stops here; the verdict that follows in the corpus is never sampled
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
SYMBOLS = ["=", "+", "-", "*", "(", ")", STOP, "Y", "N"]


@dataclass(frozen=True)
class ArithConfig:
    """The task world's parameters (they define the corpus, hence the model)."""

    max_number: int = 63  # numbers 0..max_number are single tokens; targets and operands live here
    p_correct_easy: float = 0.7  # P(right) when the first operand is even
    p_correct_hard: float = 0.3  # P(right) when the first operand is odd ...
    p_slip_hard: float = 0.5  # ... and P(the systematic slip b+1) then
    max_miss: int = 3  # other near misses are off by 1..max_miss
    test_fraction: float = 0.4  # held-out share of the targets
    split_seed: int = 0  # seed of the train/test split of targets


def build_tokenizer(cfg: ArithConfig = ArithConfig()):
    """A word-level ``PreTrainedTokenizerFast``: one token per number 0..max_number and symbol.

    Encoding prepends ``<bos>``; ``decode`` joins tokens with spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS + [str(n) for n in range(cfg.max_number + 1)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left",
    )


def _proposal(target: int, rng: random.Random, cfg: ArithConfig) -> tuple[int, str, int]:
    """A proposal (a, op, b) for ``target`` by the corpus's fallible writer.

    The writer picks ``+`` or ``-`` and a first operand a uniformly among those that admit a
    right answer, then writes the right b with probability ``p_correct_easy`` (a even) or
    ``p_correct_hard`` (a odd). On odd a it mostly makes one systematic slip, b + 1, so the
    most likely continuation is wrong there: greedy decoding inherits the slip, sampling does not.
    """
    n = cfg.max_number
    op = rng.choice("+-")
    if op == "+":
        a = rng.randint(0, target)
        b = target - a
    else:
        a = rng.randint(target, n)
        b = a - target
    u = rng.random()
    if a % 2 == 0:
        if u < cfg.p_correct_easy:
            return a, op, b
    else:
        if u < cfg.p_correct_hard:
            return a, op, b
        if u < cfg.p_correct_hard + cfg.p_slip_hard and b + 1 <= n:
            return a, op, b + 1
    candidates = [b + d for d in range(-cfg.max_miss, cfg.max_miss + 1) if d != 0 and 0 <= b + d <= n]
    return a, op, rng.choice(candidates)


def corpus_line(target: int, rng: random.Random, cfg: ArithConfig = ArithConfig()) -> str:
    """One pretraining line: ``"17 = 9 + 8 ; Y <eos>"`` (``<bos>`` is added by the tokenizer)."""
    a, op, b = _proposal(target, rng, cfg)
    verdict = "Y" if evaluate(f"{a} {op} {b}") == target else "N"
    return f"{target} = {a} {op} {b} {STOP} {verdict} <eos>"


def corpus(n_lines: int, seed: int, cfg: ArithConfig = ArithConfig()) -> list[str]:
    """``n_lines`` corpus lines with targets uniform on 0..max_number (all targets: the base model
    sees every target; train/test splits concern the probes and policies trained on top)."""
    rng = random.Random(seed)
    return [corpus_line(rng.randint(0, cfg.max_number), rng, cfg) for _ in range(n_lines)]


def split_targets(cfg: ArithConfig = ArithConfig()) -> dict[str, list[int]]:
    """Deterministic train/test split of the targets 0..max_number."""
    targets = list(range(cfg.max_number + 1))
    random.Random(cfg.split_seed).shuffle(targets)
    n_test = round(cfg.test_fraction * len(targets))
    return {"train": sorted(targets[n_test:]), "test": sorted(targets[:n_test])}


def prompts(split: str = "test", cfg: ArithConfig = ArithConfig()) -> tuple[list[str], list[int]]:
    """Prompt texts ``"t ="`` and their targets for ``split`` in {"train", "test", "all"}."""
    if split == "all":
        targets = list(range(cfg.max_number + 1))
    elif split in ("train", "test"):
        targets = split_targets(cfg)[split]
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return [f"{t} =" for t in targets], targets


# --- the whitelist evaluator -------------------------------------------------------------------

MAX_TOKENS = 32  # longer completions are malformed
MAX_DEPTH = 8  # deeper parentheses are malformed
MAX_MAGNITUDE = 10**6  # intermediate values beyond this are malformed


class _Malformed(Exception):
    pass


def _parse(tokens: list[str], pos: int, depth: int) -> tuple[int, int]:
    """expr := term (('+'|'-') term)* ; term := atom ('*' atom)* ; atom := int | '(' expr ')'."""

    def atom(i: int) -> tuple[int, int]:
        if i >= len(tokens):
            raise _Malformed
        t = tokens[i]
        if t == "(":
            if depth >= MAX_DEPTH:
                raise _Malformed
            v, j = _parse(tokens, i + 1, depth + 1)
            if j >= len(tokens) or tokens[j] != ")":
                raise _Malformed
            return v, j + 1
        if t.isdigit() and t.isascii() and len(t) <= 7:
            return int(t), i + 1
        raise _Malformed

    def term(i: int) -> tuple[int, int]:
        v, i = atom(i)
        while i < len(tokens) and tokens[i] == "*":
            w, i = atom(i + 1)
            v *= w
            if abs(v) > MAX_MAGNITUDE:
                raise _Malformed
        return v, i

    v, i = term(pos)
    while i < len(tokens) and tokens[i] in "+-":
        op = tokens[i]
        w, i = term(i + 1)
        v = v + w if op == "+" else v - w
        if abs(v) > MAX_MAGNITUDE:
            raise _Malformed
    return v, i


def _tokens(text: str) -> list[str]:
    out, num = [], ""
    for ch in text:
        if ch.isdigit() and ch.isascii():
            num += ch
            continue
        if num:
            out.append(num)
            num = ""
        if ch in "+-*()":
            out.append(ch)
        elif not ch.isspace():
            raise _Malformed
    if num:
        out.append(num)
    return out


def evaluate(text: str) -> int | None:
    """The integer value of an arithmetic expression, or ``None`` if it is malformed.

    Accepts non-negative integer literals, ``+ - *`` and parentheses; one trailing ``;`` is
    allowed. Anything else, more than ``MAX_TOKENS`` tokens, nesting deeper than ``MAX_DEPTH`` or
    a value beyond ``MAX_MAGNITUDE`` is malformed. Never evaluates code.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    body = text.strip()
    if body.endswith(STOP):
        body = body[: -len(STOP)]
    try:
        tokens = _tokens(body)
        if not tokens or len(tokens) > MAX_TOKENS:
            return None
        value, end = _parse(tokens, 0, 0)
    except (_Malformed, RecursionError):
        return None
    return value if end == len(tokens) else None


def _targets(texts, targets) -> tuple[list[str], list[int]]:
    """Validated (texts, targets): a list of strings and as many integer targets."""
    from .. import checks

    texts = checks.strings("texts", texts, allow_empty=True)
    if isinstance(targets, Tensor):
        checks.tensor("targets", targets, dims=1, integral=True)
        targets = targets.tolist()
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__len__"):
        raise TypeError(f"targets must be a sequence of ints, got {type(targets).__name__}")
    targets = [checks.integer("targets", t) for t in targets]
    if len(texts) != len(targets):
        raise ValueError(f"texts has {len(texts)} entries but targets has {len(targets)}")
    return texts, targets


def reward(texts: list[str], targets: list[int] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """r(x, y) = 1 if completion ``texts[i]`` evaluates to ``targets[i]``, else 0.

    Returns:
        [len(texts)] float32 tensor of 0/1 rewards.
    """
    texts, targets = _targets(texts, targets)
    r = [1.0 if evaluate(y) == t else 0.0 for y, t in zip(texts, targets)]
    return torch.tensor(r, dtype=torch.float32, device=device)


def hidden_score(texts: list[str], targets: list[int] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """The preference variant's hidden quality: -min(abs(value - target), 10), or -10 if malformed.

    Graded, unlike :func:`reward`: a near miss beats a far miss. Preference labels are drawn from
    it by Bradley-Terry (:func:`preference_label`); probes never see it directly.
    """
    texts, targets = _targets(texts, targets)
    s = []
    for y, t in zip(texts, targets):
        v = evaluate(y)
        s.append(-10.0 if v is None else -float(min(abs(v - t), 10)))
    return torch.tensor(s, dtype=torch.float32, device=device)


def preference_label(score_a: Tensor, score_b: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Bradley-Terry labels: 1 where a is preferred, drawn with P(a > b) = sigmoid(s_a - s_b).

    Returns:
        [n] float tensor of 0/1 labels on ``score_a``'s device.
    """
    if score_a.shape != score_b.shape:
        raise ValueError(f"score_a has shape {tuple(score_a.shape)} but score_b has {tuple(score_b.shape)}")
    p = torch.sigmoid(score_a - score_b)
    u = torch.rand(p.shape, generator=generator, device=p.device if generator is None else generator.device)
    return (u.to(p.device) < p).float()


@torch.no_grad()
def verdict_probability(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor,
                        completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """The model's own verdict P(Y | x, y) / (P(Y | x, y) + P(N | x, y)) after the stop token.

    The sampler never generates the verdict; this reads what the model would have said, the
    zero-training "self-verification" score that a Q-probe is compared against.

    Returns:
        [B] probabilities in [0, 1].
    """
    from .. import lm

    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("Y", "N")]
    logits = lm.forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits
    last = prompt_ids.shape[1] - 1 + completion_mask.long().sum(1)  # [B] position of the stop token
    logits = logits[torch.arange(logits.shape[0], device=logits.device), last][:, ids].float()
    return torch.softmax(logits, -1)[:, 0]
