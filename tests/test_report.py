"""refimpl.report: chapter numbers and claims, and the results page rendered from them."""
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from refimpl import report
from refimpl.metrics import Interval

ROOT = Path(__file__).resolve().parents[1]


def test_claims_raise_like_asserts_when_not_recording(monkeypatch):
    monkeypatch.delenv("REFIMPL_RESULTS", raising=False)
    rep = report.Report("ch")
    assert not rep.recording
    rep.claim("true", 1 < 2, a=1.0)
    with pytest.raises(AssertionError, match=r"claim does not hold: two is small \(two = 2.000\)"):
        rep.claim("two is small", 2.0 < 1, two=2.0)


def test_a_claim_expected_to_fail_is_evaluated_without_stopping_a_check_run(monkeypatch, tmp_path):
    monkeypatch.delenv("REFIMPL_RESULTS", raising=False)
    rep = report.Report("ch")
    iv = Interval(0.03, 0.05, 0.025, 0.95, "base model")
    rep.claim("fixed in advance, false at the reference", interval=iv, threshold=0.0, direction="<", expected=False)
    rep.claim("and one that holds on this machine", interval=iv, threshold=-1.0, direction=">", expected=False)
    with pytest.raises(AssertionError, match="claim does not hold"):
        rep.claim("without the mark it stops", interval=iv, threshold=0.0, direction="<")
    with pytest.raises(TypeError, match="expected"):
        rep.claim("x", True, expected="no")
    monkeypatch.setenv("REFIMPL_RESULTS", str(tmp_path))
    rep = report.Report("02_x")
    rep.claim("recorded as it came out", interval=iv, threshold=0.0, direction="<", expected=False)
    doc = json.loads((tmp_path / "02_x.json").read_text())
    assert [c["holds"] for c in doc["claims"]] == [False]


def test_recording_writes_every_number_and_claim(monkeypatch, tmp_path):
    monkeypatch.setenv("REFIMPL_RESULTS", str(tmp_path))
    rep = report.Report("02_x")
    rep.record(p=0.5, n=3, ci=(0.25, 0.125), name="gpt2")
    rep.claim("false but recorded", False, p=0.5)  # no raise
    rep.claim("true", True)
    doc = json.loads((tmp_path / "02_x.json").read_text())
    assert doc["values"] == {"p": 0.5, "n": 3, "ci": [0.25, 0.125], "name": "gpt2"}
    assert [(c["claim"], c["holds"]) for c in doc["claims"]] == [("false but recorded", False), ("true", True)]
    assert doc["claims"][0]["numbers"] == {"p": 0.5}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("value, err, match", [
    (math.nan, ValueError, "'v' must be finite"),
    (True, TypeError, "'v' must be a number"),
    ((0.5, -0.1), ValueError, "half-width >= 0"),
    ((0.5, 0.1, 0.2), TypeError, "'v' must be a number"),
    (None, TypeError, "got NoneType"),
])
def test_bad_values_are_rejected_by_name(value, err, match):
    rep = report.Report("ch", out=None)
    with pytest.raises(err, match=match):
        rep.record(v=value)
    with pytest.raises(err, match=match):
        rep.claim("x", True, v=value)


def test_bad_chapter_and_claim_text():
    with pytest.raises(ValueError, match="chapter"):
        report.Report("a/b")
    with pytest.raises(ValueError, match="text"):
        report.Report("ch").claim("", True)


def _fake_run(folder: Path, scale: str, values: dict, claims: list, figs: int):
    folder.mkdir()
    rep = report.Report("ch", out=folder)
    rep.record(**values)
    for text, holds in claims:  # holds: a bool, or the keyword arguments of a claim decided on an interval
        rep.claim(text, **holds) if isinstance(holds, dict) else rep.claim(text, holds)
    for i in range(1, figs + 1):
        (folder / f"ch-fig{i}.png").write_bytes(b"png")
    run = {"scale": scale, "device": "CPU", "date": "2026-01-01", "command": "cmd", "models_wall_s": 1.0,
           "versions": {"python": "3.11", "torch": "2", "transformers": "5", "trl": None},
           "chapters": {"ch": {"wall_s": 2.0, "status": "ok"}}}
    (folder / "run.json").write_text(json.dumps(run))


def test_render_markdown_puts_runs_side_by_side(tmp_path):
    _fake_run(tmp_path / "smoke-cpu", "smoke", {"a": 0.5, "b": (0.25, 0.01)}, [("c1", True), ("c2", True)], 10)
    _fake_run(tmp_path / "full-cuda", "full", {"a": 0.75}, [("c1", False)], 0)
    text = _page().render_markdown({"smoke-cpu": tmp_path / "smoke-cpu", "full-cuda": tmp_path / "full-cuda"})
    assert "| `a` | 0.500 | 0.750 |" in text
    assert "| `b` | 0.250 ± 0.010 | – |" in text  # missing at full scale
    assert "| c1 | holds | **does not hold** |" in text and "| c2 | holds | – |" in text
    figs = [line for line in text.splitlines() if line.startswith("![")]
    assert len(figs) == 10 and figs[1].endswith("(smoke-cpu/ch-fig2.png)") and figs[-1].endswith("ch-fig10.png)")
    with pytest.raises(ValueError, match="run.json"):
        _page().render_markdown({"x": tmp_path})
    with pytest.raises(ValueError, match="at least one"):
        _page().render_markdown({})


def test_claims_decided_on_intervals_record_what_decided_them(tmp_path):
    rep = report.Report("ch", out=tmp_path)
    iv = Interval(0.3, 0.1, se=0.05, level=0.95, unit="base model × prompt")  # [0.2, 0.4]
    rep.claim("A beats B", interval=iv, threshold=0.0, direction=">")
    rep.claim("A beats B by a quarter", interval=iv, threshold=0.25, direction=">", n_models=6)
    rep.claim("A and C are the same", interval=Interval(0.01, 0.02, se=0.012, level=0.9), threshold=0.0,
              direction="within", margin=0.05, unit="base model")
    rep.claim("an identity", True)
    doc = json.loads((tmp_path / "ch.json").read_text())
    first, second, same, identity = doc["claims"]
    assert first == {"claim": "A beats B", "holds": True, "numbers": {}, "statistic": 0.3, "low": pytest.approx(0.2),
                     "high": pytest.approx(0.4), "level": 0.95, "se": 0.05, "threshold": 0.0, "direction": ">",
                     "margin": None, "unit": "base model × prompt", "margin_se": pytest.approx(6.0)}
    assert second["holds"] is False and second["numbers"] == {"n_models": 6} and second["margin_se"] == pytest.approx(1.0)
    assert same["holds"] is True and same["margin"] == 0.05 and same["unit"] == "base model" and same["level"] == 0.9
    assert same["margin_se"] == pytest.approx(0.04 / 0.012)  # 0.01 lies 0.04 inside the nearer bound 0.05
    assert identity == {"claim": "an identity", "holds": True, "numbers": {}}  # the old form, unchanged


def test_interval_claims_raise_with_their_interval_and_reject_mixed_forms(monkeypatch):
    monkeypatch.delenv("REFIMPL_RESULTS", raising=False)
    rep = report.Report("ch", out=None)
    iv = Interval(0.3, 0.1, se=0.05, level=0.95, unit="prompt")
    rep.claim("clears", interval=iv, threshold=0.1, direction=">")
    with pytest.raises(AssertionError, match=r"does not hold: A < 0.35 \(0.300 \[0.200, 0.400\] < 0.350; margin 1.0 SE\)"):
        rep.claim("A < 0.35", interval=iv, threshold=0.35, direction="<")
    with pytest.raises(ValueError, match="not both"):
        rep.claim("x", True, interval=iv, threshold=0.0, direction=">")
    with pytest.raises(TypeError, match="needs holds"):
        rep.claim("x")
    with pytest.raises(ValueError, match="threshold, direction: only with interval"):
        rep.claim("x", True, threshold=0.0, direction=">")
    with pytest.raises(ValueError, match="needs threshold= and direction="):
        rep.claim("x", interval=iv, direction=">")
    with pytest.raises(ValueError, match="unit must name the unit of replication"):
        rep.claim("x", interval=Interval(0.3, 0.1, level=0.95), threshold=0.0, direction=">")
    with pytest.raises(ValueError, match="confidence level"):
        rep.claim("x", interval=Interval(0.3, 0.1, unit="prompt"), threshold=0.0, direction=">")
    with pytest.raises(ValueError, match="margin"):
        rep.claim("x", interval=iv, threshold=0.0, direction="within")
    with pytest.raises(TypeError, match="interval must be a metrics.Interval"):
        rep.claim("x", interval=(0.3, 0.1), threshold=0.0, direction=">", unit="prompt")


def test_render_shows_the_interval_threshold_and_margin_of_decided_claims(tmp_path):
    iv = Interval(0.3, 0.1, se=0.05, level=0.95, unit="base model × prompt")
    _fake_run(tmp_path / "smoke-cpu", "smoke", {}, [("A beats B", dict(interval=iv, threshold=0.0, direction=">")),
                                                    ("old", True)], 0)
    _fake_run(tmp_path / "full-cuda", "full", {}, [("A beats B", dict(interval=Interval(0.05, 0.1, se=0.05, level=0.95,
                                                                                       unit="base model × prompt"),
                                                                        threshold=0.0, direction=">"))], 0)
    text = _page().render_markdown({"smoke-cpu": tmp_path / "smoke-cpu", "full-cuda": tmp_path / "full-cuda"})
    assert ("| A beats B (base model × prompt; 95% interval) | holds: 0.300 [0.200, 0.400] > 0.000; margin 6.0 SE | "
            "**does not hold**: 0.050 [-0.050, 0.150] > 0.000; margin 1.0 SE |") in text
    assert "| old | holds | – |" in text


def _page():
    sys.path.insert(0, str(ROOT / "scripts"))
    import results_page

    return results_page


def _run_scale():
    spec = importlib.util.spec_from_file_location("run_scale", ROOT / "scripts" / "run_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_page_matches_committed_results():
    """book/results/summary.md is generated, never edited: it must equal what the runner writes."""
    run_scale = _run_scale()
    committed = (ROOT / "book" / "results" / "summary.md").read_text()
    assert committed == run_scale.summary_text(), "run `python scripts/run_scale.py --render`"
    for folder in (ROOT / "book" / "results").glob("*/run.json"):
        run = json.loads(folder.read_text())
        assert all(c["status"] == "ok" for c in run["chapters"].values()), f"{folder.parent.name}: a chapter failed"


def test_one_element_tensors_count_as_numbers():
    import torch

    rep = report.Report("ch", out=None)
    rep.record(slope=torch.tensor(-1.02, dtype=torch.float64), n=torch.tensor([3]))
    assert rep.values == {"slope": -1.02, "n": 3}
    with pytest.raises(TypeError, match="'v' must have one element"):
        rep.record(v=torch.zeros(2))
    with pytest.raises(ValueError, match="'v' must be finite"):
        rep.record(v=torch.tensor(float("inf")))


def test_recording_keeps_non_finite_numbers_as_findings(tmp_path):
    rep = report.Report("ch", out=tmp_path)
    rep.record(x=math.nan, ci=(0.5, math.inf))
    rep.claim("x is small", True, x=math.nan)  # a claim on a NaN cannot hold
    doc = json.loads((tmp_path / "ch.json").read_text())
    assert doc["values"] == {"x": "nan", "ci": [0.5, "inf"]}
    assert doc["claims"][0]["holds"] is False


def test_numbers_of_other_libraries():
    import torch

    rep = report.Report("ch", out=None)
    rep.record(pair=(torch.tensor(0.5), torch.tensor([0.25])), i=torch.tensor(3, dtype=torch.int64))
    assert rep.values == {"pair": (0.5, 0.25), "i": 3} and isinstance(rep.values["i"], int)
    np = pytest.importorskip("numpy")
    rep.record(n=np.int64(3), f=np.float32(0.5))
    assert rep.values["n"] == 3 and isinstance(rep.values["n"], int) and rep.values["f"] == 0.5


def test_render_escapes_table_cells_and_flags_unfinished_chapters(tmp_path):
    _fake_run(tmp_path / "smoke-cpu", "smoke", {"a": "x|y"}, [("P(.|allowed) is small", True)], 0)
    run = json.loads((tmp_path / "smoke-cpu" / "run.json").read_text())
    run["chapters"]["ch"]["status"] = "running"
    (tmp_path / "smoke-cpu" / "run.json").write_text(json.dumps(run))
    text = _page().render_markdown({"smoke-cpu": tmp_path / "smoke-cpu"})
    assert "| P(.\\|allowed) is small | holds |" in text and "| `a` | x\\|y |" in text
    assert "this chapter did not finish (running)" in text


def test_runner_refuses_stale_scripts_and_scrubs_paths(tmp_path, monkeypatch):
    run_scale = _run_scale()
    monkeypatch.setattr(run_scale, "SCRIPTS", tmp_path)
    with pytest.raises(FileNotFoundError, match="--prepare"):
        run_scale.chapter_script("00_worlds")
    (tmp_path / "00_worlds.py").write_text("# source sha256: 0000\nprint(1)\n")
    with pytest.raises(RuntimeError, match="stale"):
        run_scale.chapter_script("00_worlds")
    (tmp_path / "00_worlds.py").write_text(f"# source sha256: {run_scale.source_hash('00_worlds')}\nprint(1)\n")
    assert run_scale.chapter_script("00_worlds") == tmp_path / "00_worlds.py"
    line = f'File "{ROOT}/refimpl/kl.py", line 3; {sys.prefix}/lib/x.py'
    assert run_scale.scrub(line) == 'File "<repo>/refimpl/kl.py", line 3; <python>/lib/x.py'


def test_committed_results_hold_no_machine_paths():
    pattern = re.compile(r"(?<![\w.<])/(home|root|tmp|work|usr|opt|mnt|Users|private|var)/")
    for path in (ROOT / "book" / "results").rglob("*"):
        if path.suffix in {".json", ".log", ".md", ".txt"}:
            assert not pattern.search(path.read_text()), f"{path.name} holds an absolute path"
