r"""What a chapter reports: its headline numbers and its empirical claims, for the results page.

A chapter opens a :class:`Report`, records numbers with :meth:`Report.record` and states claims
about them with :meth:`Report.claim`. Read interactively (or under nbval) a false claim raises
``AssertionError``, like an ``assert``. Run by ``scripts/run_scale.py``, which sets
``$REFIMPL_RESULTS`` to a folder, nothing raises: every number and every claim, true or false, is
written to ``<folder>/<chapter>.json`` as soon as it is known, so a claim that fails at another
scale becomes a finding on the "Results at scale" page instead of ending the run.

Identities (a closed form, a gradient, a bound) stay plain ``assert`` statements: they hold at every
scale. Claims are statements about trained models that a larger scale may overturn. An empirical
claim is a decision on an interval fixed in advance (``claim(text, interval=iv, threshold=0.0,
direction=">")``, see :func:`refimpl.metrics.decide`): it holds only if the interval clears the
threshold, and "the same" only through an equivalence margin (``direction="within"``). The form
``claim(text, holds, **numbers)`` is kept for exact identities.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from numbers import Integral, Real
from pathlib import Path

from . import checks, metrics

__all__ = ["Report", "results_dir", "reference_dir", "format_value", "format_decision"]

Value = float | int | str | tuple[float, float]
_FROM_ENV = object()  # Report's default ``out``: ``$REFIMPL_RESULTS``


def results_dir() -> Path | None:
    """``$REFIMPL_RESULTS`` as a path, or ``None`` when results are not being written."""
    root = os.environ.get("REFIMPL_RESULTS")
    return Path(root) if root else None


def _number(name: str, value, lenient: bool) -> int | float | str:
    """A finite int/float from a Python, NumPy or one-element torch number. Non-finite: ValueError,
    or (``lenient``) the string ``"nan"``/``"inf"``/``"-inf"``."""
    if hasattr(value, "numel") and hasattr(value, "item"):  # a tensor or array
        if value.numel() != 1:
            raise TypeError(f"value of {name!r} must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"value of {name!r} must be a number, a string or a (mean, half-width) pair, "
                        f"got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond the float range
        as_float = math.inf if value > 0 else -math.inf
    if not math.isfinite(as_float):
        if lenient:
            return str(as_float)
        raise ValueError(f"value of {name!r} must be finite (and within the float range), got {as_float}")
    return int(value) if isinstance(value, Integral) else float(value)


def _check_value(name: str, value, lenient: bool = False) -> Value:
    """Validate one recorded value (see :meth:`Report.record`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise TypeError(f"value of {name!r} must be a number, a string or a (mean, half-width) pair, "
                            f"got a sequence of {len(value)}")
        mean, half = (_number(name, v, lenient) for v in value)
        if isinstance(mean, str) or isinstance(half, str):
            return (mean, half)
        if half < 0:
            raise ValueError(f"value of {name!r} must be a mean and a half-width >= 0, got {value}")
        return (float(mean), float(half))
    return _number(name, value, lenient)


def _finite(v: Value) -> bool:
    """False for a number recorded as ``"nan"``/``"inf"``/``"-inf"`` (alone or in a pair)."""
    return not any(x in ("nan", "inf", "-inf") for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, str))


def reference_dir() -> Path | None:
    """The committed results of this scale and device (``book/results/<scale>-<device>/`` of the
    repository), or ``$REFIMPL_REFERENCE``; ``None`` when there is none (refimpl installed alone)."""
    from .config import device, get_scale

    root = os.environ.get("REFIMPL_REFERENCE")
    if root:
        return Path(root)
    scale = get_scale()
    folder = Path(__file__).resolve().parents[1] / "book" / "results" / f"{scale.name}-{device(scale).type}"
    return folder if folder.is_dir() else None


class Report:
    """The numbers and claims of one chapter (``chapter`` is the notebook's name, e.g. ``"02_qprobe"``).

    Args:
        chapter: the notebook's file name without extension.
        out: folder to write ``<chapter>.json`` into; by default ``$REFIMPL_RESULTS`` (when unset,
            and with ``out=None``, everything stays in memory and false claims raise).
        reference: folder of committed results that :meth:`check` compares with; by default
            :func:`reference_dir` when not recording, ``None`` (no comparison) when recording.
    """

    def __init__(self, chapter: str, out=_FROM_ENV, reference=_FROM_ENV):
        if not isinstance(chapter, str) or not chapter or "/" in chapter:
            raise ValueError(f"chapter must be a non-empty file stem, got {chapter!r}")
        self.chapter = chapter
        if out is not _FROM_ENV and out is not None and (not isinstance(out, (str, os.PathLike)) or not os.fspath(out)):
            raise ValueError(f"out must be a folder path or None, got {out!r}")
        self.out = results_dir() if out is _FROM_ENV else (Path(out) if out is not None else None)
        self.values: dict[str, Value] = {}
        self.tolerances: dict[str, float] = {}
        self.claims: list[dict] = []
        if reference is _FROM_ENV:
            reference = None if self.out is not None else reference_dir()
        path = Path(reference) / f"{chapter}.json" if reference is not None else None
        self.reference: dict | None = json.loads(path.read_text())["values"] if path and path.exists() else None
        if self.out is not None:
            self._write()

    def check(self, name: str, value, tol: float) -> None:
        """Record a number that comes out of training or sampling, and compare it with the committed
        reference: ``|value - reference| <= tol`` must hold (``AssertionError`` otherwise).

        Such numbers change with the CPU's floating-point kernels (another machine trains another
        model), so they are never compared digit by digit; ``tol`` states how far they may move.
        Without a reference (recording it, or refimpl installed alone) the value is only recorded.
        """
        if not isinstance(tol, Real) or isinstance(tol, bool) or not tol >= 0 or not math.isfinite(tol):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        value = _check_value(name, value, lenient=self.recording)
        self.values[name] = value
        self.tolerances[name] = float(tol)
        self._write()
        if self.reference is None:
            return
        if name not in self.reference:
            raise AssertionError(f"{name!r} has no committed reference: run "
                                 f"`python3 dev.py sync notebooks/{self.chapter}.md` and commit book/results/")
        ref, got = self.reference[name], value
        ref, got = (ref[0] if isinstance(ref, list) else ref), (got[0] if isinstance(got, tuple) else got)
        if isinstance(ref, str) or isinstance(got, str) or abs(got - ref) > tol:
            raise AssertionError(f"{name} = {format_value(got)} but the committed reference is "
                                 f"{format_value(ref)} (tolerance {tol:g})")

    @property
    def recording(self) -> bool:
        """True when results go to a folder and false claims are recorded instead of raised."""
        return self.out is not None

    def record(self, **values: Value) -> None:
        """Record headline numbers: ``rep.record(base_pass1=0.35, pg=(0.967, 0.034))``.

        A pair is a mean and the half-width of its 95% interval. Names are keyword arguments.
        A non-finite number raises ``ValueError``, unless recording, where it is stored as
        ``"nan"``/``"inf"`` so that a run at another scale reports it instead of stopping.
        """
        for name, value in values.items():
            self.values[name] = _check_value(name, value, lenient=self.recording)
        self._write()

    def claim(self, text: str, holds=None, *, interval: metrics.Interval | None = None, threshold: float | None = None,
              direction: str | None = None, margin: float | None = None, unit: str | None = None,
              expected: bool = True, **numbers: Value) -> None:
        """State a claim: a decision on an interval, or (``holds``) an exact identity.

        ``claim(text, interval=iv, threshold=t, direction=">")`` holds iff ``iv.low > t`` (``"<"``:
        ``iv.high < t``; ``"within"`` with ``margin=m``: ``[iv.low, iv.high]`` inside ``(t - m, t + m)``,
        an equivalence test: pass a 90% interval for a test at 5%); see :func:`refimpl.metrics.decide`.
        Threshold, direction and margin are fixed before the data are seen. ``unit`` names the unit
        of replication (default ``iv.unit``; one of them must name it). Recorded: the statistic, the
        interval and its level, the threshold, the direction, the margin, the unit, the standard
        error and ``margin_se``, how far the statistic lies inside the claimed region in standard errors.

        ``claim(text, holds, **numbers)``: a claim decided by the caller (exact identities, and
        chapters not yet migrated); ``numbers`` are the quantities it compares. Passing both
        ``holds`` and ``interval`` is an error.

        ``expected=False`` marks a claim fixed in advance that the reference run found false: a check
        run (nbval) evaluates it and does not stop on it, whichever way it comes out, and the results
        page lists it as it came out. Nothing else may use it: a claim is never adjusted to pass.

        Raises ``AssertionError`` when the claim is false (and ``expected``) and results are not being recorded;
        otherwise appends it to :attr:`claims` (the runner reports the false ones). A claim whose numbers
        are not all finite is recorded as not holding. Returns nothing, so a claim on a notebook
        cell's last line leaves no output.
        """
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        if holds is not None and interval is not None:
            raise ValueError("pass holds (a claim decided by the caller) or interval= (a decision on an interval), "
                             "not both")
        if holds is None and interval is None:
            raise TypeError("claim needs holds (a claim decided by the caller) or interval= (a decision on an interval)")
        extra = [k for k, v in dict(threshold=threshold, direction=direction, margin=margin, unit=unit).items()
                 if v is not None]
        if interval is None and extra:
            raise ValueError(f"{', '.join(extra)}: only with interval=, not with holds")
        size = holds.numel() if hasattr(holds, "numel") else getattr(holds, "size", 1)  # tensor, array or scalar
        if holds is not None and (isinstance(holds, (str, bytes, list, tuple, dict)) or size != 1):
            raise TypeError(f"holds must be a bool (the claim decided by the caller), got {type(holds).__name__}")
        nums = {name: _check_value(name, v, lenient=self.recording) for name, v in numbers.items()}
        decided = {} if interval is None else self._decision(interval, threshold, direction, margin, unit)
        holds = (decided.pop("holds") if decided else bool(holds)) and all(_finite(v) for v in nums.values())
        checks.boolean("expected", expected)
        if not self.recording:
            if not holds and expected:
                detail = ", ".join(([format_decision(decided)] if decided else [])
                                   + [f"{k} = {format_value(v)}" for k, v in nums.items()])
                raise AssertionError(f"claim does not hold: {text}" + (f" ({detail})" if detail else ""))
            return
        self.claims.append({"claim": text, "holds": holds, "numbers": nums, **decided})
        self._write()

    def _decision(self, interval, threshold, direction, margin, unit) -> dict:
        """The recorded fields of a claim decided on ``interval`` (see :meth:`claim`)."""
        if threshold is None or direction is None:
            raise ValueError("a claim on an interval needs threshold= and direction= (one of "
                             f"{metrics.DIRECTIONS}), fixed in advance")
        decision = metrics.decide(interval, threshold, direction, margin)
        if interval.level is None:
            raise ValueError("interval must carry its confidence level (the metrics functions set it)")
        unit = interval.unit if unit is None else unit
        if not isinstance(unit, str) or not unit.strip():
            raise ValueError(f"unit must name the unit of replication (unit=..., or an interval that carries one), "
                             f"got {unit!r}")
        num = lambda name, v: None if v is None else _check_value(name, v, lenient=self.recording)  # noqa: E731
        return {"holds": decision.holds, "statistic": num("statistic", interval.mean),
                "low": num("low", interval.low), "high": num("high", interval.high), "level": interval.level,
                "se": num("se", interval.se), "threshold": float(threshold), "direction": direction,
                "margin": None if margin is None else float(margin), "unit": unit, "margin_se": decision.margin_se}

    def _write(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"chapter": self.chapter, "values": self.values, "tolerances": self.tolerances, "claims": self.claims}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.chapter}.", suffix=".json", dir=self.out)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
        os.replace(tmp, self.out / f"{self.chapter}.json")  # readers never see a half-written file


def format_decision(c: dict) -> str:
    """A claim decided on an interval as the results page shows it:
    ``0.012 [0.003, 0.021] > 0.000; margin 2.6 SE`` (``within 0.000 ± 0.050`` for an equivalence)."""
    need = (f"within {format_value(c['threshold'])} ± {format_value(c['margin'])}" if c["direction"] == "within"
            else f"{c['direction']} {format_value(c['threshold'])}")
    se = "–" if c.get("margin_se") is None else f"{c['margin_se']:.1f}"
    return f"{format_value(c['statistic'])} [{format_value(c['low'])}, {format_value(c['high'])}] {need}; margin {se} SE"


def format_value(v: Value) -> str:
    """A recorded value as the results page shows it (3 decimals, or 3 significant digits)."""
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (tuple, list)):
        return " ± ".join(x if isinstance(x, str) else format_value(float(x)) for x in v)
    return f"{v:.3g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.3f}"
