"""Overhead of I-DLE in ``generate``, and the cost of the sequence-level corrected sampler.

1. Per-step latency of ``model.generate`` (fixed length, no early stop) with no processor, with
   ``SuppressTokensLogitsProcessor`` and with ``IDLELogitsProcessor``; ratio to no processor
   (the issue's target: within 2%).
2. Cost per returned sample of plain sampling (anchor), I-DLE sampling, importance resampling with
   k particles (``corrected_sample``) and rejection sampling (per *accepted* sample).
All numbers are medians of several runs measured in the same run on the same device.

    python bench/bench_idle.py [--device cpu] [--repeats 5] [--batch 256] [--k 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import describe, median_time  # noqa: E402

from refimpl import config, idle, lm, load_model  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=str(config.device()))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="rows per generate call")
    ap.add_argument("--steps", type=int, default=8, help="new tokens per generate call")
    ap.add_argument("--k", type=int, default=8, help="particles of the corrected sampler")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config.quiet()
    device = torch.device(args.device)
    from transformers import GenerationConfig, SuppressTokensLogitsProcessor

    model, tok = load_model("refimpl/toy-arith", device=device)
    prompts, _ = arith.prompts("test")
    ban = [tok.convert_tokens_to_ids("0")]  # a digit: most answers need it somewhere
    print(describe(device))

    # 1. per-step latency: eos disabled so every call decodes exactly `steps` tokens
    enc = tok([prompts[i % len(prompts)] for i in range(args.batch)], return_tensors="pt", padding=True).to(device)
    gen = GenerationConfig(do_sample=True, max_new_tokens=args.steps, min_new_tokens=args.steps, top_k=0,
                           top_p=1.0, eos_token_id=None, pad_token_id=tok.pad_token_id)
    procs = {"none": [], "suppress": [SuppressTokensLogitsProcessor(ban, device=device)],
             "idle": [idle.IDLELogitsProcessor(ban)]}
    # interleave the variants run by run, so that load drifting on a shared machine hits all alike
    runs = {name: [] for name in procs}
    for name, p in procs.items():  # warm-up
        model.generate(**enc, generation_config=gen, logits_processor=p)
    for _ in range(args.repeats):
        for name, p in procs.items():
            runs[name].append(median_time(lambda: model.generate(**enc, generation_config=gen, logits_processor=p),
                                          device, repeats=1, warmup=0))
    per_step = {name: statistics.median(ts) / args.steps for name, ts in runs.items()}
    for name, t in per_step.items():
        print(f"generate per step  {name:9s} {1e3 * t:8.3f} ms   ratio to none {t / per_step['none']:.3f}")

    # 2. cost per returned sample
    B, k = len(prompts), args.k
    # one warm-up of each path first (median_time warms up once too)
    plain = median_time(lambda: lm.sample(model, tok, prompts, k=k, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0), device,
                        repeats=args.repeats) / (B * k)
    masked = median_time(lambda: lm.sample(model, tok, prompts, k=k, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0,
                                           logits_processor=[idle.IDLELogitsProcessor(ban)]), device,
                         repeats=args.repeats) / (B * k)
    sir = median_time(lambda: idle.corrected_sample(model, tok, prompts, ban, k=k, n=1, max_new_tokens=arith.MAX_NEW_TOKENS),
                      device, repeats=args.repeats) / B
    _, acc = idle.rejection_sample(model, tok, prompts, ban, k=k, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0)
    rej = median_time(lambda: idle.rejection_sample(model, tok, prompts, ban, k=k, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0),
                      device, repeats=args.repeats) / max(int(acc.sum()), 1)
    for name, t in [("plain", plain), ("idle", masked), (f"corrected k={k}", sir), ("rejection", rej)]:
        print(f"per sample  {name:14s} {1e3 * t:8.3f} ms   ratio to plain {t / plain:.2f}")
    print(f"rejection acceptance rate {acc.float().mean():.3f}")


if __name__ == "__main__":
    main()
