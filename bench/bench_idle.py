"""Overhead of I-DLE in ``generate``, and the cost of the sequence-level samplers against their k particles.

1. Per-step latency of ``model.generate`` (fixed length, no early stop) with no processor, with
   ``SuppressTokensLogitsProcessor`` and with ``IDLELogitsProcessor``; ratio to no processor
   (target: within 1% at a 150k vocabulary).
2. Cost per prompt of drawing k particles plainly (``lm.sample``, the anchor), of I-DLE sampling,
   of importance resampling over k I-DLE particles (``idle.corrected_sample``), of SMC with k
   particles (``smc.smc`` with ``ConstrainedStep``) and of rejection sampling from k plain draws
   (target for the corrected sampler and SMC: at most 1.2x the anchor).
The variants alternate round by round; every ratio is paired within a round (median and range).
On ``toy`` the banned token is the digit 0; on the random-weight shapes of ``bench/shapes.py`` it is
every 100th id (1% of the vocabulary) and completions run to ``--new-tokens`` tokens.

    python bench/bench_idle.py [--shape cpu-qwen2] [--device cpu] [--repeats 5] [--batch 64] [--steps 32]
                               [--prompts 8] [--k 8] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402
from timing import describe, interleaved, ratio_spread, spread  # noqa: E402

from refimpl import config, idle, lm, smc  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="toy", choices=shapes.SHAPES)
    ap.add_argument("--device", default=str(config.device()))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="rows per generate call (part 1)")
    ap.add_argument("--steps", type=int, default=8, help="new tokens per generate call (part 1)")
    ap.add_argument("--prompts", type=int, default=26, help="prompts (part 2; toy: the test split's 26)")
    ap.add_argument("--k", type=int, default=8, help="particles per prompt (part 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion budget (part 2; toy: the task's)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config.quiet()
    device = torch.device(args.device)
    from transformers import GenerationConfig, SuppressTokensLogitsProcessor

    model, tok = shapes.load(args.shape, device, getattr(torch, args.dtype))
    V = model.get_input_embeddings().weight.shape[0]
    if args.shape == "toy":
        prompts = arith.prompts("test")[0][: args.prompts]
        ban, new_tokens = [tok.convert_tokens_to_ids("0")], args.new_tokens or arith.MAX_NEW_TOKENS
    else:
        prompts = shapes.prompts(tok, args.prompts)
        ban, new_tokens = list(range(0, V - 1, 100)), args.new_tokens or 32
    print(describe(device))
    print(f"{args.shape}: vocabulary {V}, {len(ban)} banned ids; {args.repeats} rounds")

    # 1. per-step latency: eos disabled so every call decodes exactly `steps` tokens
    with lm.padding_side(tok, "left"):
        enc = tok([prompts[i % len(prompts)] for i in range(args.batch)], return_tensors="pt", padding=True).to(device)
    gen = GenerationConfig(do_sample=True, max_new_tokens=args.steps, min_new_tokens=args.steps, top_k=0,
                           top_p=1.0, eos_token_id=None, pad_token_id=tok.pad_token_id)
    procs = {"none": [], "suppress": [SuppressTokensLogitsProcessor(ban, device=device)],
             "idle": [idle.IDLELogitsProcessor(ban)]}

    def run(p):
        with torch.no_grad():
            return lambda: model.generate(**enc, generation_config=gen, logits_processor=p)

    t1 = interleaved({name: run(p) for name, p in procs.items()}, device, args.repeats)
    print(f"1. generate, {args.batch} rows x {args.steps} steps: ms per step, median [range]; ratio to none (paired)")
    for name, ts in t1.items():
        print(f"   {name:9s} {spread(ts, 1e3 / args.steps):>30s}   ratio {ratio_spread(ts, t1['none'])}")

    # 2. cost per prompt, each sampler with k particles
    B, k = len(prompts), args.k
    kw = dict(max_new_tokens=new_tokens)
    step = smc.ConstrainedStep(ban)
    fns = {
        "plain k": lambda: lm.sample(model, tok, prompts, k=k, seed=0, **kw),
        "idle k": lambda: lm.sample(model, tok, prompts, k=k, seed=0, logits_processor=[idle.IDLELogitsProcessor(ban)], **kw),
        "corrected": lambda: idle.corrected_sample(model, tok, prompts, ban, k=k, n=1, **kw),
        "smc": lambda: smc.smc(model, tok, prompts, step, k=k, **kw),
        "rejection": lambda: idle.rejection_sample(model, tok, prompts, ban, k=k, seed=0, **kw),
    }
    t2 = interleaved(fns, device, args.repeats)
    _, acc = idle.rejection_sample(model, tok, prompts, ban, k=k, seed=0, **kw)
    print(f"2. {B} prompts x k = {k} particles, {new_tokens} new tokens: ms per prompt, median [range]; "
          "ratio to plain k (paired)")
    for name, ts in t2.items():
        print(f"   {name:10s} {spread(ts, 1e3 / B):>30s}   ratio {ratio_spread(ts, t2['plain k'])}")
    print(f"   rejection accepts {acc.float().mean():.3f} of its draws (one accepted sample costs "
          f"{1 / max(acc.float().mean().item(), 1e-9):.1f} draws)")


if __name__ == "__main__":
    main()
