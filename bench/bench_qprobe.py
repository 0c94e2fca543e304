"""Cost of scoring k candidates with a Q-probe, relative to generating them.

The anchor is generating the candidates (``refimpl.lm.sample``), measured in the same run on the
same device. Two ways to score them:

* ``embed``: a second, batched forward pass over prompt + completion (``lm.embed``), then the probe;
* ``during``: the features read while decoding (``lm.sample(..., features_layer=-1)``, no second
  pass), then the probe; its cost is the extra time of that sampling call over the anchor's.

Both end with the softmax(Q/beta) choice among each prompt's k candidates. The variants alternate
round by round; every ratio is paired within a round (median and range). On the random-weight
shapes of ``bench/shapes.py`` every completion has exactly L tokens (``--lengths``); on ``toy``
the task's completions (the stop token ends them; ``--lengths`` is the token budget).

    python bench/bench_qprobe.py [--shape cpu-gpt2] [--k 8] [--prompts 8] [--lengths 64,256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from timing import describe, interleaved, ratio_spread, spread  # noqa: E402

from refimpl import config, lm, qprobe, resample  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="toy", choices=shapes.SHAPES)
    ap.add_argument("--k", type=int, default=48, help="candidates per prompt")
    ap.add_argument("--prompts", type=int, default=26, help="prompts (toy: the test split has 26)")
    ap.add_argument("--lengths", default="8", help="completion lengths, e.g. 64,256")
    ap.add_argument("--repeats", type=int, default=5, help="rounds")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    config.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else config.device()
    model, tok = shapes.load(args.shape, device, getattr(torch, args.dtype))
    if args.shape == "toy":
        xs = arith.prompts("test")[0]
        xs = (xs * (args.prompts // len(xs) + 1))[: args.prompts]
    else:
        xs = shapes.prompts(tok, args.prompts)
    probe = qprobe.QProbe(model.config.hidden_size).to(device)
    B, k = len(xs), args.k
    print(describe(device))
    print(f"{args.shape}: {B} prompts x k = {k} candidates; {args.repeats} rounds; ms per call, median [range]; "
          "ratios to generate, paired by round")
    for L in [int(v) for v in args.lengths.split(",") if v]:
        held = {}

        def generate():
            held["s"] = lm.sample(model, tok, xs, k=k, max_new_tokens=L, seed=0)

        def during():
            s = lm.sample(model, tok, xs, k=k, max_new_tokens=L, seed=0, features_layer=-1)
            with torch.no_grad():
                return resample.select(probe(s.features).reshape(B, k), 0.1)

        def embed():
            s = held["s"]  # the anchor's candidates, already generated
            phi = lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, before_last=True)
            with torch.no_grad():
                return resample.select(probe(phi).reshape(B, k), 0.1)

        t = interleaved({"generate": generate, "during": during, "embed": embed}, device, args.repeats)
        extra = [d - g for d, g in zip(t["during"], t["generate"])]
        tokens = float(held["s"].completion_mask.sum(1).float().mean())
        print(f"L = {L} (mean completion {tokens:.1f} tokens): generate {spread(t['generate'], 1e3)}; "
              f"generate with features + probe {spread(t['during'], 1e3)}; embed + probe {spread(t['embed'], 1e3)}")
        print(f"    scoring / generate: during decoding {ratio_spread(extra, t['generate'])}, "
              f"second pass {ratio_spread(t['embed'], t['generate'])}")


if __name__ == "__main__":
    main()
