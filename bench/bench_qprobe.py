"""Cost of scoring k candidates with a Q-probe (embed + probe) relative to generating them.

The anchor is the generation of the same candidates (``refimpl.lm.sample``), measured in the same
run on the same device; the script prints medians of several runs and the ratio, for the toy
arithmetic model (one forward pass over already-generated tokens against a decoding loop).

    python bench/bench_qprobe.py [--k 48] [--prompts 26] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time  # noqa: E402

from refimpl import config, lm, load_model, qprobe, resample  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (after one warm-up call) and the warm-up's result."""
    out = fn()  # every call returns the same (seeded) result
    return median_time(fn, device, repeats, warmup=0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=48, help="candidates per prompt")
    ap.add_argument("--prompts", type=int, default=26, help="prompts (the test split has 26)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    ap.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    config.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("refimpl/toy-arith", device=args.device)
    device = next(model.parameters()).device
    xs, _ = arith.prompts("all")
    xs = (xs * (args.prompts // len(xs) + 1))[: args.prompts]
    probe = qprobe.QProbe(model.config.n_embd).to(device)

    generate = lambda: lm.sample(model, tok, xs, k=args.k, max_new_tokens=8, seed=0)
    t_gen, s = timed(generate, device, args.repeats)

    def score():
        phi = lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)  # [P*k, d]
        with torch.no_grad():
            return resample.select(probe(phi).reshape(len(xs), args.k), 0.1)  # [P]

    t_score, _ = timed(score, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {len(xs)} prompts x k = {args.k} candidates; medians of {args.repeats} runs")
    print(f"generate (anchor): {t_gen * 1e3:9.1f} ms")
    print(f"embed + probe:     {t_score * 1e3:9.1f} ms")
    print(f"ratio score/generate: {t_score / t_gen:.3f}")


if __name__ == "__main__":
    main()
