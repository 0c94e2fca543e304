"""Retrain the smoke-scale models the repository ships (``models/``) and write their model cards.

    python scripts/ship_models.py            # every model in refimpl.models.TOY_MODELS
    python scripts/ship_models.py toy-arith-weak

Each model is trained from scratch (deterministic on one machine type: seeded, single process,
``refimpl.models.TRAIN_THREADS`` threads) into a temporary cache, measured on the held-out test
prompts, and copied to ``models/<name>/`` with a ``README.md`` model card. Another CPU gives
other bits (BLAS kernels), so a retrained model is checked against quality bands, not bytes
(``tests/test_models.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refimpl import config, lm, metrics  # noqa: E402
from refimpl.models import TOY_MODELS, load_model, shipped_dir, toy_model_path  # noqa: E402
from refimpl.worlds import arith  # noqa: E402

N_SAMPLES = 48  # samples per test prompt for the model card


@torch.no_grad()
def quality(path: Path, n: int = N_SAMPLES) -> dict:
    """pass@1, pass@n, greedy and (for models with verdicts) the verdict's AUC on the test prompts."""
    model, tok = load_model(path, device="cpu")
    prompts, targets = arith.prompts("test")
    s = lm.sample(model, tok, prompts, k=n, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0)
    r = arith.reward(s.texts, s.expand(targets)).view(len(prompts), n)
    g = lm.sample(model, tok, prompts, k=1, max_new_tokens=arith.MAX_NEW_TOKENS, temperature=0)
    out = {"test_prompts": len(prompts), "samples_per_prompt": n,
           "pass@1": round(r.mean().item(), 3), f"pass@{n}": round(metrics.pass_at_k(r.sum(1), n, n).mean().item(), 3),
           "greedy": round(arith.reward(g.texts, targets).mean().item(), 3),
           "prompts_never_solved": int((r.sum(1) == 0).sum()), "prompts_always_solved": int((r.mean(1) == 1).sum())}
    if "Y" in tok.get_vocab():
        v = arith.verdict_probability(model, tok, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
        out["verdict_auc"] = round(metrics.auc(v, r.reshape(-1)), 3)
    return out


def card(name: str, info: dict, q: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in q.items())
    recipe = "\n".join(f"| {k} | {v} |" for k, v in info.items() if k not in ("name", "scale"))
    return f"""# refimpl/{name}

A model the book *KL-constrained reward maximization for language models* trains itself and
ships, so that every reader's chapters start from the same weights. Load it with
`refimpl.load_model("refimpl/{name}")` (or `transformers.AutoModelForCausalLM.from_pretrained`
on this folder). Retrain with `python3 dev.py models` (`scripts/ship_models.py`).

## Recipe

{"The exact world's model: a 2-layer GPT-2 on a random Markov chain over a..d (see `refimpl.worlds.exact`)." if name == "toy-exact" else "GPT-2 trained on the fallible writer's column-addition corpus (`refimpl.worlds.writer`), loss on the tokens after `=` only, AdamW, warmup then cosine decay (`refimpl.models.pretrain`)."}

| field | value |
|---|---|
{recipe}

## Measured on the held-out test prompts (sampling at temperature 1, seed 0)

| metric | value |
|---|---|
{rows}
"""


def ship(name: str) -> dict:
    full = f"refimpl/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["REFIMPL_CACHE"] = os.environ.get("REFIMPL_SHIP_CACHE") or tmp  # a kept cache: reruns skip training
        t0 = time.time()
        path = toy_model_path(full, "smoke", shipped=False)
        seconds = round(time.time() - t0, 1)
        info = json.loads((path / "refimpl_info.json").read_text())
        q = {} if name == "toy-exact" else quality(path)
        dest = shipped_dir() / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(path, dest)
    info = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()}
    (dest / "refimpl_info.json").write_text(json.dumps({**info, "quality": q}, indent=1) + "\n")
    (dest / "README.md").write_text(card(name, info, q))
    return {"name": name, **q, "seconds": seconds}  # wall time, training included when not cached


def main() -> None:
    names = sys.argv[1:] or [n.split("/")[-1] for n in TOY_MODELS]
    unknown = [n for n in names if f"refimpl/{n}" not in TOY_MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {[n.split('/')[-1] for n in TOY_MODELS]}")
    config.quiet()
    for n in names:
        print(json.dumps(ship(n)), flush=True)


if __name__ == "__main__":
    main()
