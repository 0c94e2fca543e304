r"""What a chapter reports: its headline numbers and its empirical claims, for the results page.

A chapter opens a :class:`Report`, records numbers with :meth:`Report.record` and states claims
about them with :meth:`Report.claim`. Read interactively (or under nbval) a false claim raises
``AssertionError``, like an ``assert``. Run by ``scripts/run_scale.py``, which sets
``$REFIMPL_RESULTS`` to a folder, nothing raises: every number and every claim, true or false, is
written to ``<folder>/<chapter>.json`` as soon as it is known, so a claim that fails at another
scale becomes a finding on the "Results at scale" page instead of ending the run.

Identities (a closed form, a gradient, a bound) stay plain ``assert`` statements: they hold at every
scale. Claims are statements about trained models that a larger scale may overturn.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from numbers import Integral, Real
from pathlib import Path

__all__ = ["Report", "results_dir", "load_results", "render_markdown"]

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
    if not math.isfinite(float(value)):
        if lenient:
            return str(float(value))
        raise ValueError(f"value of {name!r} must be finite, got {value}")
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


class Report:
    """The numbers and claims of one chapter (``chapter`` is the notebook's name, e.g. ``"02_qprobe"``).

    Args:
        chapter: the notebook's file name without extension.
        out: folder to write ``<chapter>.json`` into; by default ``$REFIMPL_RESULTS`` (when unset,
            and with ``out=None``, everything stays in memory and false claims raise).
    """

    def __init__(self, chapter: str, out=_FROM_ENV):
        if not isinstance(chapter, str) or not chapter or "/" in chapter:
            raise ValueError(f"chapter must be a non-empty file stem, got {chapter!r}")
        self.chapter = chapter
        self.out = results_dir() if out is _FROM_ENV else (Path(out) if out is not None else None)
        self.values: dict[str, Value] = {}
        self.claims: list[dict] = []
        if self.out is not None:
            self._write()

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

    def claim(self, text: str, holds, **numbers: Value) -> None:
        """State an empirical claim; ``numbers`` are the quantities it compares.

        Raises ``AssertionError`` when the claim is false and results are not being recorded;
        otherwise appends it to :attr:`claims` (and prints it when false). A claim whose numbers
        are not all finite is recorded as not holding. Returns nothing, so a claim on a notebook
        cell's last line leaves no output.
        """
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        nums = {name: _check_value(name, v, lenient=self.recording) for name, v in numbers.items()}
        holds = bool(holds) and all(_finite(v) for v in nums.values())
        if not self.recording:
            if not holds:
                detail = ", ".join(f"{k} = {_fmt(v)}" for k, v in nums.items())
                raise AssertionError(f"claim does not hold: {text}" + (f" ({detail})" if detail else ""))
            return
        self.claims.append({"claim": text, "holds": holds, "numbers": nums})
        self._write()
        if not holds:
            print(f"CLAIM DOES NOT HOLD: {text}", {k: _fmt(v) for k, v in nums.items()})

    def _write(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"chapter": self.chapter, "values": self.values, "claims": self.claims}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.chapter}.", suffix=".json", dir=self.out)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
        os.replace(tmp, self.out / f"{self.chapter}.json")  # readers never see a half-written file


def load_results(folder: str | os.PathLike) -> dict:
    """``{"run": run.json, "chapters": {chapter: <chapter>.json}, "figures": {chapter: [png names]}}``."""
    folder = Path(folder)
    if not (folder / "run.json").exists():
        raise ValueError(f"folder {str(folder)!r} holds no run.json (not a results folder)")
    run = json.loads((folder / "run.json").read_text())
    chapters, figures = {}, {}
    for ch in run["chapters"]:
        path = folder / f"{ch}.json"
        chapters[ch] = json.loads(path.read_text()) if path.exists() else {"values": {}, "claims": []}
        figures[ch] = sorted((p.name for p in folder.glob(f"{ch}-fig*.png")), key=lambda n: int(n[len(ch) + 4:-4]))
    return {"run": run, "chapters": chapters, "figures": figures}


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (tuple, list)):
        return " ± ".join(x if isinstance(x, str) else f"{x:.3f}" for x in v)
    return f"{v:.3g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.3f}"


def _run_header(name: str, run: dict) -> str:
    v = run["versions"]
    walls = ", ".join(f"{ch} {c['wall_s']:.0f} s" + ("" if c["status"] == "ok" else f" ({c['status']})")
                      for ch, c in run["chapters"].items())
    return (f"**{name}**: scale `{run['scale']}` on {run['device']}; {run['date']}; "
            f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}"
            + (f", TRL {v['trl']}" if v.get("trl") else "")
            + f"; commit {run.get('commit') or 'unknown'}. Toy models ready in {run['models_wall_s']:.0f} s "
            f"(trained, or read from the cache); chapters: {walls}. Command: `{run['command']}`.")


def render_markdown(folders: dict[str, str | os.PathLike]) -> str:
    """The results page's tables and figures from results folders, ``{column title: folder}``.

    One section per chapter: a table of every recorded number (one column per run), a table of
    every claim (holds / does not hold, per run) and the figures. Paths to figures are relative
    to the folders' parent.
    """
    if not folders:
        raise ValueError("folders must name at least one results folder")
    runs = {name: load_results(f) for name, f in folders.items()}
    names = list(runs)
    lines = ["## Runs", ""]
    for name in names:
        lines += ["- " + _run_header(name, runs[name]["run"])]
    chapters = list(dict.fromkeys(ch for r in runs.values() for ch in r["run"]["chapters"]))
    for ch in chapters:
        lines += ["", f"## {ch}", ""]
        for n in names:
            status = runs[n]["run"]["chapters"].get(ch, {}).get("status", "ok")
            if status != "ok":
                lines += [f"**{n}: this chapter did not finish ({status}); its numbers and claims stop where "
                          f"it stopped.**", ""]
        keys = list(dict.fromkeys(k for r in runs.values() for k in r["chapters"].get(ch, {"values": {}})["values"]))
        if keys:
            lines += ["| quantity | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
            for k in keys:
                cells = [_cell(_fmt(runs[n]["chapters"][ch]["values"][k])) if ch in runs[n]["chapters"]
                         and k in runs[n]["chapters"][ch]["values"] else "–" for n in names]
                lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
            lines.append("")
        texts = list(dict.fromkeys(c["claim"] for r in runs.values() for c in r["chapters"].get(ch, {"claims": []})["claims"]))
        if texts:
            lines += ["| claim | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
            for t in texts:
                cells = []
                for n in names:
                    found = [c for c in runs[n]["chapters"].get(ch, {"claims": []})["claims"] if c["claim"] == t]
                    cells.append("–" if not found else ("holds" if found[0]["holds"] else "**does not hold**"))
                lines.append(f"| {_cell(t)} | " + " | ".join(cells) + " |")
            lines.append("")
        for n in names:
            figs = runs[n]["figures"].get(ch, [])
            if figs:
                rel = Path(folders[n]).name
                lines += [f"Figures, {n}:", ""] + [f"![{ch} {n} {f}]({rel}/{f})" for f in figs] + [""]
    return "\n".join(lines).rstrip() + "\n"
