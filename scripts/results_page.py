"""The "Results at scale" page: tables and figures rendered from the results folders that
``scripts/run_scale.py`` writes (``book/results/<scale>-<device>/``).

    python scripts/run_scale.py --render      # rewrite book/results/summary.md

The schema it reads is the one ``run_scale.py`` writes beside it: ``run.json`` (device, versions,
date, commit, wall times, per-chapter status) and ``<chapter>.json`` (a chapter's
:class:`refimpl.report.Report`: recorded values and claims), plus ``<chapter>-fig<N>.png``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from refimpl.report import format_decision, format_value as _fmt

__all__ = ["load_results", "render_markdown"]


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


def _claim_cell(c: dict) -> str:
    """holds / **does not hold**, and for a claim decided on an interval what decided it."""
    verdict = "holds" if c["holds"] else "**does not hold**"
    return verdict + (f": {format_decision(c)}" if "direction" in c else "")


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
    every claim (holds / does not hold, per run; for a claim decided on an interval also the
    statistic, its interval, the threshold with its direction and the margin in standard errors,
    with the unit and level beside the claim) and the figures. Paths to figures are relative
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
                cells, about = [], ""
                for n in names:
                    found = [c for c in runs[n]["chapters"].get(ch, {"claims": []})["claims"] if c["claim"] == t]
                    cells.append("–" if not found else _claim_cell(found[0]))
                    if found and "direction" in found[0] and not about:
                        level = found[0].get("level")
                        about = f" ({found[0]['unit']}" + (f"; {level:.0%} interval)" if level else ")")
                lines.append(f"| {_cell(t + about)} | " + " | ".join(cells) + " |")
            lines.append("")
        for n in names:
            figs = runs[n]["figures"].get(ch, [])
            if figs:
                rel = Path(folders[n]).name
                lines += [f"Figures, {n}:", ""] + [f"![{ch} {n} {f}]({rel}/{f})" for f in figs] + [""]
    return "\n".join(lines).rstrip() + "\n"
