"""The shape of refimpl: no import loop, no import that runs back up the layers, compact modules,
no printing in the library, and registries derived from the files rather than typed by hand."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "refimpl"

# Lower layers never import higher ones; a module may import its own layer or any lower one.
LAYERS = [
    {"checks"},
    {"config"},
    {"kl", "resample", "metrics", "report"},
    {"sampling", "_hidden"},
    {"lm"},
    {"worlds", "worlds.arith", "worlds.exact", "worlds.writer"},
    {"pools", "qprobe", "gvpo", "grpo", "idle", "rft", "constraints", "smc",
     "tracking", "particles", "twist",
     "bestofn", "dpo", "klpg",
     "preferences", "klest",
     "losses", "allowed"},
    {"rl", "tabular",
     "frontier"},
    {"models", "trl_gvpo_config", "trl_gvpo"},
    {"__init__"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__") if name != "__init__" else name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """refimpl modules imported anywhere in the file (top level or inside functions)."""
    package = name.rsplit(".", 1)[0] if "." in name or path.name == "__init__.py" else ""
    if path.name == "__init__.py":
        package = name if name != "__init__" else ""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("refimpl"):
                mod = node.module.removeprefix("refimpl").lstrip(".")
            else:
                continue
            for alias in node.names:
                cand = f"{mod}.{alias.name}" if mod else alias.name
                found.add(cand if cand in known else mod)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("refimpl."):
                    found.add(alias.name.removeprefix("refimpl."))
    return {m for m in found if m in known and m != name}


def test_every_module_has_a_layer():
    assert set(_modules()) <= set(LAYER), f"add to LAYERS: {sorted(set(_modules()) - set(LAYER))}"


def test_no_import_runs_back_up_and_no_loop():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    for name, deps in graph.items():
        for dep in deps:
            assert LAYER[dep] <= LAYER[name], f"refimpl.{name} imports refimpl.{dep}, a higher layer"
    # Same-layer imports are allowed; they must not form a loop either.
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            assert state.get(d) != 1, f"import loop: {' -> '.join(stack + [n, d])}"
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: p.name)
def test_modules_stay_compact_and_do_not_print(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 320, f"{path.name} has {len(lines)} lines: split it (one concept per module)"
    calls = [n for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert not calls, f"{path.name} prints: library code returns values (the callers print)"


def test_chapter_and_benchmark_lists_come_from_the_files():
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("run_scale", ROOT / "scripts" / "run_scale.py")
    run_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_scale)
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.md"))
    assert sorted(run_scale.CHAPTERS) == notebooks, "every notebook must be in _toc.yml (and only those)"
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    spec.loader.exec_module(run_all)
    assert run_all.BENCHES == sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


def test_every_module_is_exported_and_documented():
    import refimpl

    api = (ROOT / "book" / "api.md").read_text()
    public = sorted(m for m in _modules() if m not in ("__init__", "worlds") and not m.startswith("_"))
    undocumented = [m for m in public if f"automodule:: refimpl.{m}\n" not in api]
    assert not undocumented, f"book/api.md has no automodule for {undocumented}"
    top = sorted({m.split(".")[0] for m in public} - {"trl_gvpo", "trl_gvpo_config"})  # they need the optional TRL
    assert [m for m in top if m not in refimpl.__all__] == [], "export every module in refimpl/__init__.py"
