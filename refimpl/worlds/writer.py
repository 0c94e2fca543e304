r"""The fallible writer of the column-addition corpus (:mod:`refimpl.worlds.arith`).

The writer adds column by column, units first. An incoming carry of 1 is forgotten with a
probability set by the column (``WorldConfig.p_forget_*``: the leading column, a column with one,
two or three nonzero digits); a carry of 2 or more is written as 1 ("carry the one"). Subtractions
forget borrows and do "smaller from larger". :func:`writer_law` is the writer's exact law over
answers, so each prompt's difficulty, :func:`writer_accuracy`, is known exactly. Every corpus line
ends with the checker's verdict on the writer's answer, after the stop token; with
``WorldConfig.verdict_fraction`` f < 1, a line carries it with probability f, drawn per line (in
:func:`corpus` from a stream of its own, so that the problems and answers do not depend on f; with f
= 0 or 1 nothing is drawn, and f = 0 gives the corpus of ``verdict=False``).
"""
from __future__ import annotations

import random
from typing import Sequence

from .. import checks
from .arith import STOP, WIDTH, WorldConfig, _held_out, answer_text, check_problem, draw_problem, prompt_text, value

__all__ = ["writer_law", "writer_answer", "writer_accuracy", "difficulty", "corpus_line", "corpus"]


# --- the writer's law --------------------------------------------------------------------------

def _p_forget(n_digits: int, cfg: WorldConfig) -> float:
    if n_digits == 0:
        return cfg.p_forget_leading
    if n_digits <= 2:
        return cfg.p_forget_short[n_digits - 1]
    return cfg.p_forget_long


def _add_branches(xs: Sequence[int], cfg: WorldConfig) -> list[tuple[float, int]]:
    """Every way the writer can add ``xs``, as (probability, written value) pairs."""
    states = [(1.0, 0, 0)]  # (probability, carry into the current column, value written so far)
    for j in range(WIDTH + 1):
        col = [(x // 10**j) % 10 for x in xs]
        k = sum(1 for d in col if d)
        nxt = []
        for p, carry, acc in states:
            if carry >= 2:
                options = [(cfg.p_carry_the_one, 1), (1 - cfg.p_carry_the_one, carry)]
            elif carry == 1:
                options = [(_p_forget(k, cfg), 0), (1 - _p_forget(k, cfg), 1)]
            else:
                options = [(1.0, 0)]
            for q, c in options:
                if q > 0:
                    s = sum(col) + c
                    nxt.append((p * q, s // 10, acc + (s % 10) * 10**j))
        states = nxt
    return [(p, acc) for p, _, acc in states]  # a carry out of the last column is lost (never happens)


def _sub_branches(a: int, b: int, cfg: WorldConfig) -> list[tuple[float, int]]:
    states = [(1.0, 0, 0)]  # (probability, borrow into the column, value written so far)
    for j in range(WIDTH + 1):
        x, y = (a // 10**j) % 10, (b // 10**j) % 10
        nxt = []
        for p, borrow, acc in states:
            for q, bw in ([(cfg.p_forget_borrow, 0), (1 - cfg.p_forget_borrow, 1)] if borrow else [(1.0, 0)]):
                if q <= 0:
                    continue
                if x - bw < y:  # the column needs a borrow
                    nxt.append((p * q * cfg.p_smaller_from_larger, 0, acc + abs(x - bw - y) * 10**j))
                    nxt.append((p * q * (1 - cfg.p_smaller_from_larger), 1, acc + (x - bw - y + 10) * 10**j))
                else:
                    nxt.append((p * q, 0, acc + (x - bw - y) * 10**j))
        states = nxt
    return [(p, acc) for p, _, acc in states if p > 0]


def _checked(problem, cfg, rng: object = False) -> None:
    """Checked problem, cfg (and rng, when passed)."""
    check_problem(problem), checks.instance("cfg", cfg, WorldConfig)
    if rng is not False:
        checks.instance("rng", rng, random.Random)


def writer_law(problem: tuple, cfg: WorldConfig = WorldConfig()) -> dict[int, float]:
    """The writer's exact distribution over written answers for ``problem``."""
    _checked(problem, cfg)
    return _writer_law(problem, cfg)


def _writer_law(problem: tuple, cfg: WorldConfig) -> dict[int, float]:
    op, *xs = problem
    branches = _sub_branches(*xs, cfg) if op == "-" else _add_branches(xs, cfg)
    law: dict[int, float] = {}
    for p, v in branches:
        law[v] = law.get(v, 0.0) + p
    return law


def writer_answer(problem: tuple, rng: random.Random, cfg: WorldConfig = WorldConfig()) -> int:
    """One answer drawn from the writer's law."""
    _checked(problem, cfg, rng)
    return _writer_answer(problem, rng, cfg)


def _writer_answer(problem: tuple, rng: random.Random, cfg: WorldConfig) -> int:
    law = _writer_law(problem, cfg)
    u, acc = rng.random(), 0.0
    for v, p in sorted(law.items()):
        acc += p
        if u < acc:
            return v
    return max(law, key=law.get)


def writer_accuracy(problem: tuple, cfg: WorldConfig = WorldConfig()) -> float:
    """P(the writer is right) for ``problem``: the prompt's difficulty, exactly."""
    _checked(problem, cfg)
    return _writer_law(problem, cfg).get(value(problem), 0.0)


def difficulty(problem: tuple, cfg: WorldConfig = WorldConfig()) -> dict:
    """What makes a prompt hard: its carries (borrows), their size and columns, and the writer's
    accuracy that results."""
    _checked(problem, cfg)
    op, *xs = problem
    carries, big, leading = 0, 0, False
    if op == "-":
        borrow = 0
        for j in range(WIDTH):
            d = (xs[0] // 10**j) % 10 - borrow - (xs[1] // 10**j) % 10
            borrow = int(d < 0)
            carries += borrow
    else:
        carry = 0
        for j in range(WIDTH + 1):
            s = sum((x // 10**j) % 10 for x in xs) + carry
            if carry:
                carries += 1
                big += carry >= 2
                leading |= j == WIDTH
            carry = s // 10
    return {"operands": len(xs), "carries": carries, "big_carries": big, "leading_carry": leading,
            "writer_accuracy": writer_accuracy(problem, cfg)}


# --- corpus and prompt sets ---------------------------------------------------------------------

def corpus_line(problem: tuple, rng: random.Random, cfg: WorldConfig = WorldConfig()) -> str:
    """``"4 7 + 8 5 + 0 3 = 5 3 1 ; Y <eos>"`` (``<bos>`` is added by the tokenizer). With
    ``0 < cfg.verdict_fraction < 1``, whether the verdict is written is drawn from ``rng`` too,
    after the answer."""
    _checked(problem, cfg, rng)
    return _corpus_line(problem, rng, cfg)


def _corpus_line(problem: tuple, rng: random.Random, cfg: WorldConfig, verdict_rng: random.Random | None = None) -> str:
    a = _writer_answer(problem, rng, cfg)
    f = cfg.verdict_fraction  # 0 and 1 draw nothing: the default corpus is unchanged
    keep = cfg.verdict and (f == 1 or (f > 0 and (verdict_rng or rng).random() < f))
    verdict = (" Y" if a == value(problem) else " N") if keep else ""
    return f"{prompt_text(problem)} {answer_text(a)} {STOP}{verdict} <eos>"


def corpus(n_lines: int, seed: int, cfg: WorldConfig = WorldConfig()) -> list[str]:
    """``n_lines`` pretraining lines (held-out prompts excluded; ``WorldConfig`` keeps some prompts in)."""
    n_lines = checks.integer("n_lines", n_lines, low=0)
    rng = random.Random(checks.integer("seed", seed))
    checks.instance("cfg", cfg, WorldConfig)
    verdict_rng = random.Random(f"verdicts {seed}")  # which lines carry a verdict: its own stream
    out = []
    while len(out) < n_lines:
        p = draw_problem(rng, "sub" if rng.random() < cfg.subtraction_share else "add", cfg)
        if not _held_out(p, cfg.held_out_mod):
            out.append(_corpus_line(p, rng, cfg, verdict_rng))
    return out
