"""Checked cells and identity tolerances hold on any CPU, BLAS kernel and thread count.

nbval compares the stored output of every *checked* cell (first line ``# NBVAL_CHECK_OUTPUT``) with
a fresh run, and CI re-runs the notebooks under other BLAS kernels. A float32 result differs across
kernels, CPUs and thread counts in its last bits (about 1e-7 of its scale), and a float64 result
computed from float32 numbers (the exact world's log-probabilities come out of a float32 forward
pass) inherits that. Two rules follow, and these tests enforce the part of them that can be read
off the committed notebooks without running them (so they run in a second).

1. **What a checked cell prints** (its stored stream and ``text/plain`` outputs):

   * no nonzero number below 1e-4 in absolute value: such a number is round-off itself (e.g.
     ``max |log sum pi_ref| = 1.2e-07``, which reads ``2.4e-07`` on another CPU), or a quantity
     whose printed digits a few ulps can move. Print a bound instead
     (``print("... < 1e-5:", bool(x < 1e-5))``); a number that appears verbatim in the cell's
     source (the ``1e-5`` of that label) is a literal, not a result, and is allowed. Exact zeros
     are allowed;
   * no float with more than 6 significant digits: float32 carries about 7, so the 7th printed
     digit is not reproducible (integers, i.e. counts, are exact and exempt).

   Whether a printed digit sits close to a rounding boundary cannot be read off the output (a
   share 59/200 = 0.295 printed with two decimals is a tie that the summation order decides; print
   it with three): choose each precision so that the value lies well inside its rounding interval,
   and let CI's second run under other kernels (``dev.py notebooks --other-blas``) check the rest.

2. **Identity tolerances** (every code cell of every chapter): a numeric literal below 1e-6 used
   in a comparison (``<``, ``<=``, ``>``, ``>=``, or as ``atol=``/``rtol=``) is tighter than float32
   arithmetic guarantees for a quantity of order one (its unit round-off is 6e-8, and every
   operation adds some). Such a tolerance is only right when the quantity is computed in float64:
   the statement that holds the literal must then say so by containing the word ``float64``, in
   code (``dtype=torch.float64``) or as a comment (``# float64``) written after checking that
   every operand of the comparison is float64 (and, for an identity, that it holds exactly in
   real arithmetic once its float32 inputs are fixed -- e.g. renormalize a float32 ``log pi``
   in float64 before using ``sum pi = 1``). Otherwise compare with a tolerance relative to the
   quantity's float32 scale (``1e-5`` for order-one quantities).
"""
from __future__ import annotations

import io
import json
import re
import tokenize
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CHECK = "# NBVAL_CHECK_OUTPUT"
SMALLEST_PRINTED = 1e-4  # a nonzero printed result below this is round-off (rule 1)
MAX_SIGNIFICANT = 6  # float32 carries ~7 significant digits; the 7th is not reproducible (rule 1)
TIGHTEST_FLOAT32_TOL = 1e-6  # a comparison literal below this needs float64 (rule 2)
MARKER = "float64"

# a number as printed: optional sign, digits with an optional fraction, optional exponent; not part
# of a name (``pi_ref2``) and not the tail of a longer number
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")
COMPARISONS = {"<", "<=", ">", ">="}
TOLERANCE_KWARGS = {"atol", "rtol"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _text_outputs(cell: dict) -> str:
    """The stream and text/plain outputs of a code cell, concatenated."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def _code_cells(nb: dict) -> list[tuple[int, str, dict]]:
    return [(i, _source(c), c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def _checked_cells(nb: dict) -> list[tuple[int, str, dict]]:
    return [(i, s, c) for i, s, c in _code_cells(nb) if s.startswith(CHECK)]


def _significant_digits(text: str) -> int:
    mantissa = re.split(r"[eE]", text.lstrip("+-"))[0].replace(".", "")
    return len(mantissa.lstrip("0")) or 1


def printed_number_problems(source: str, output: str) -> list[str]:
    """Rule 1 for one checked cell: the printed numbers that rounding can move."""
    literals = set(NUMBER.findall(source))
    problems = []
    for text in NUMBER.findall(output):
        value = float(text)
        is_float = any(ch in text for ch in ".eE")
        if value != 0 and abs(value) < SMALLEST_PRINTED and text.lstrip("+-") not in literals:
            problems.append(f"{text}: a nonzero result below {SMALLEST_PRINTED:g} is round-off; print a bound")
        elif is_float and _significant_digits(text) > MAX_SIGNIFICANT:
            problems.append(f"{text}: more than {MAX_SIGNIFICANT} significant digits; float32 does not fix them")
    return problems


def _statements(source: str):
    """(tokens, text) of each logical line (statement) of ``source`` that holds a number; a
    statement spans several physical lines when its brackets do, and its text includes their
    comments."""
    lines = source.splitlines(keepends=True)
    current = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if not current and tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            continue  # comment lines above a statement are not part of it
        current.append(tok)
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if any(t.type == tokenize.NUMBER for t in current):
                first, last = current[0].start[0], current[-1].end[0]
                yield current, "".join(lines[first - 1:last])
            current = []


def tolerance_problems(source: str) -> list[str]:
    """Rule 2 for one code cell: tolerances below float32's reach without a float64 statement."""
    problems = []
    for tokens, text in _statements(source):
        compares = any(t.type == tokenize.OP and t.string in COMPARISONS for t in tokens) or any(
            a.type == tokenize.NAME and a.string in TOLERANCE_KWARGS and b.string == "="
            for a, b in zip(tokens, tokens[1:]))
        if not compares:
            continue
        for t in tokens:
            if t.type != tokenize.NUMBER:
                continue
            try:
                value = float(t.string.replace("_", ""))
            except ValueError:  # complex or other literals
                continue
            if 0 < value < TIGHTEST_FLOAT32_TOL and MARKER not in text:
                problems.append(f"line {t.start[0]}: {t.string} in a comparison without '{MARKER}' in the "
                                f"statement: {text.strip()[:120]}")
    return problems


def test_there_are_checked_cells():
    assert sum(len(_checked_cells(_load(p))) for p in NOTEBOOKS) >= 40


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_checked_cells_print_no_round_off(path):
    bad = []
    for i, source, cell in _checked_cells(_load(path)):
        bad += [f"cell {i}: {p}" for p in printed_number_problems(source, _text_outputs(cell))]
    assert not bad, f"{path.name}: checked cells print numbers that rounding can move:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tight_tolerances_are_float64(path):
    bad = []
    for i, source, _ in _code_cells(_load(path)):
        bad += [f"cell {i} {p}" for p in tolerance_problems(source)]
    assert not bad, f"{path.name}: tolerances tighter than float32 on statements not marked float64:\n" + "\n".join(bad)


# The rules themselves, on the two cases found on an AVX-512 CPU.
def test_rule_1_catches_printed_round_off():
    src = f'{CHECK}\nprint(f"max |log sum pi_ref| = {{total.abs().max():.1e}}")'
    assert printed_number_problems(src, "max |log sum pi_ref| = 1.2e-07\n")
    assert printed_number_problems(src, "x = 0.12345678\n")  # 8 significant digits
    ok = f'{CHECK}\nprint("max |log sum pi_ref| < 1e-5:", bool(x < 1e-5))'
    assert not printed_number_problems(ok, "max |log sum pi_ref| < 1e-5: True\n")
    assert not printed_number_problems(ok, "0.0 0 4096 0.0006 [1.0, 0.0] 12 of 16 -1.03 4.64e-03\n")


def test_rule_2_catches_float32_tolerances():
    bad = "assert all(kl_base[k] <= math.log(k) + 1e-9 for k in grid)  # the log k cap\n"
    assert tolerance_problems(bad)
    assert tolerance_problems("assert torch.allclose(a,\n    b, atol=1e-12)\n")
    assert not tolerance_problems("assert all(kl_base[k] <= math.log(k) + 1e-9 for k in grid)  # float64\n")
    assert not tolerance_problems("x = torch.zeros(3, dtype=torch.float64); assert (x < 1e-12).all()\n")
    assert not tolerance_problems("assert torch.allclose(a, b, atol=1e-5)\n")
    assert not tolerance_problems('opt = LBFGS(w, tolerance_grad=1e-12)\nc.clamp(min=1e-17)\n')
    assert not tolerance_problems('report.claim("KL < 1e-12 within 600 steps", n < 600)\n')
    assert tolerance_problems("# float64 above does not count\nassert x < 1e-12\n")
