"""Where the time goes: the operators that take most of one call, by torch.profiler (self time).

    python bench/profile_ops.py [--shape cpu-gpt2] [--what sample|gvpo|idle|corrected|smc] [--rows 32]
                                [--new-tokens 64] [--top 8] [--device cpu]

``sample`` is one ``lm.sample`` call (rows = prompts x k); ``gvpo`` one step of ``refimpl.rl.train``
(GVPO, reference anchor, k = 4); ``idle`` one ``lm.sample`` with ``IDLELogitsProcessor``;
``corrected`` one ``idle.corrected_sample`` and ``smc`` one ``smc.smc`` with ``ConstrainedStep``
(k = 8), banning every 100th id. Each is run once before it is profiled. The table lists the
operators with the largest self time and their share of the call.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

from refimpl import config, idle, lm, rl, smc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="cpu-gpt2", choices=shapes.SHAPES[1:])
    ap.add_argument("--what", default="sample", choices=["sample", "gvpo", "idle", "corrected", "smc"])
    ap.add_argument("--rows", type=int, default=32, help="completions (prompts x k)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    config.quiet()
    device = torch.device(a.device) if a.device else config.device()
    model, tok = shapes.load(a.shape, device)
    V = model.config.vocab_size
    ban = list(range(0, V - 1, 100))
    k = 4 if a.what in ("sample", "gvpo") else 8
    xs = shapes.prompts(tok, max(1, a.rows // k))
    kw = dict(max_new_tokens=a.new_tokens)
    if a.what == "gvpo":
        ref, _ = shapes.load(a.shape, device)
        cfg = rl.RLConfig(k=k, prompts_per_step=len(xs), steps=1, lr=1e-6, max_new_tokens=a.new_tokens)
        call = lambda: rl.train(model, ref, tok, xs, [0] * len(xs), shapes.even_share, cfg)  # noqa: E731
    else:
        call = {
            "sample": lambda: lm.sample(model, tok, xs, k=k, seed=0, **kw),
            "idle": lambda: lm.sample(model, tok, xs, k=k, seed=0, logits_processor=[idle.IDLELogitsProcessor(ban)], **kw),
            "corrected": lambda: idle.corrected_sample(model, tok, xs, ban, k=k, **kw),
            "smc": lambda: smc.smc(model, tok, xs, smc.ConstrainedStep(ban), k=k, **kw),
        }[a.what]
    call()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    print(f"{a.what} on {a.shape} ({device}), {len(xs) * k} rows, {a.new_tokens} new tokens: "
          f"{total / 1e6:.2f} s of {'device' if device.type == 'cuda' else 'CPU'} self time")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[: a.top]:
        print(f"  {getattr(e, attr) / total:6.1%}  {e.count:6d} calls  {e.key}")


if __name__ == "__main__":
    main()
