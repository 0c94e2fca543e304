"""Benchmark: one GVPO training step against one step of TRL's GRPOTrainer: samples/s and peak memory.

Every contender trains the arithmetic toy model on the same batch (``--prompts`` prompts x k
completions), with the same generation budget (the answer's digits and the stop token) and a
reference-model forward, and runs in its own process, so that its peak memory is its own:

* ``refimpl``: :func:`refimpl.rl.train` with the GVPO loss, reference anchor (sampling with the KV
  cache, the reference's log-probs without grad, one forward + backward + AdamW step; the
  generating policy's log-probs come from that forward, since the rollout feeds one update). Its process also times ``lm.sample`` alone on the same batch, the
  anchor whose ratio to the step is comparable across machines;
* ``trl-grpo``: TRL's ``GRPOTrainer`` (beta = 0.04, so that it runs its reference forward too;
  one generation per optimizer step, gradient checkpointing off);
* ``trl-gvpo``: :class:`refimpl.trl_gvpo.GVPOTrainer`, the GVPO adapter on TRL's loop, reference
  anchor.

Step times are medians over ``--rounds`` x ``--repeats`` steps (each process drops its first,
warm-up step); the contenders run in turn, round after round. Peak memory is the growth
of the process's peak resident set (CPU) or of ``torch.cuda.max_memory_allocated`` (CUDA) from the
moment the policy is loaded, so it counts the reference model, the optimizer state and the
step's activations. The TRL contenders are skipped when ``trl`` is not installed.

    python bench/bench_gvpo.py [--device cuda] [--prompts 16] [--k 4] [--repeats 5] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from timing import sync, time_once  # noqa: E402

from refimpl import config, lm, rl  # noqa: E402
from refimpl.worlds import arith  # noqa: E402

CONTENDERS = ("refimpl", "trl-grpo", "trl-gvpo")


def _task(args):
    """(prompts, targets, reward(texts, targets) -> [n] tensor, new tokens) of ``args.shape``: the
    arithmetic task on ``toy``; on a random-weight shape, random prompts and a cheap stand-in reward
    (the share of even token ids in the completion), with completions of ``--new-tokens`` tokens."""
    if args.shape == "toy":
        prompts, targets = arith.prompts("train")
        return prompts[: args.prompts], targets[: args.prompts], arith.reward, arith.MAX_NEW_TOKENS
    tok = shapes.tokenizer(shapes.config(args.shape).vocab_size)
    return shapes.prompts(tok, args.prompts), [0] * args.prompts, shapes.even_share, args.new_tokens


def _rss_bytes() -> int:
    """The process's current resident set (Linux: /proc/self/statm)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory:
    """Peak memory growth from construction: peak RSS on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.start = _rss_bytes()

    def peak_growth(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start)


def _step_times(stamps: list[float]) -> list[float]:
    """Per-step times from the end-of-step stamps (the first stamp is the start), warm-up dropped."""
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]


def run_refimpl(device: torch.device, shape: str, task, P: int, k: int, repeats: int) -> dict:
    prompts, targets, reward, new_tokens = task
    policy, tok = shapes.load(shape, device)
    mem = _Memory(device)
    ref, _ = shapes.load(shape, device)
    cfg = rl.RLConfig(k=k, prompts_per_step=P, steps=repeats + 1, lr=1e-6, max_new_tokens=new_tokens)
    stamps: list[float] = []

    def stamp(*_):
        sync(device)
        stamps.append(time.perf_counter())

    stamp()
    log = rl.train(policy, ref, tok, prompts, targets, reward, cfg, callback=stamp)
    peak = mem.peak_growth()
    sample = lambda: lm.sample(policy, tok, prompts, k=k, max_new_tokens=new_tokens, seed=0)  # noqa: E731
    sample()
    t_sample = statistics.median(time_once(sample, device) for _ in range(repeats))
    return dict(steps_s=_step_times(stamps), peak_bytes=peak, sample_s=t_sample, length=statistics.mean(log.length))


def run_trl(device: torch.device, shape: str, task, P: int, k: int, repeats: int, gvpo: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts, targets, reward, new_tokens = task
    policy, tok = shapes.load(shape, device)
    mem = _Memory(device)
    data = Dataset.from_dict({"prompt": list(prompts) * (repeats + 1), "target": list(targets) * (repeats + 1)})
    stamps: list[float] = []
    lengths: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync(device)
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    def reward_fn(prompts, completions, target, **kw):
        return reward(completions, target).tolist()

    common = dict(per_device_train_batch_size=P * k, num_generations=k, max_completion_length=new_tokens,
                  max_steps=repeats + 1, learning_rate=1e-6, report_to="none", use_cpu=device.type == "cpu",
                  save_strategy="no", logging_steps=1, bf16=False, temperature=1.0, gradient_checkpointing=False,
                  disable_tqdm=True, disable_dropout=True)  # refimpl trains in eval mode (no dropout) too
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if gvpo:
            from refimpl.trl_gvpo import GVPOTrainer, GVPOTrainerConfig

            cfg = GVPOTrainerConfig(output_dir=out, gvpo_beta=0.1, gvpo_anchor="reference", **common)
            trainer = GVPOTrainer(model=policy, reward_funcs=reward_fn, args=cfg, train_dataset=data,
                                  processing_class=tok, callbacks=[Stamp()])
        else:
            cfg = GRPOConfig(output_dir=out, beta=0.04, **common)
            trainer = GRPOTrainer(model=policy, reward_funcs=reward_fn, args=cfg, train_dataset=data,
                                  processing_class=tok, callbacks=[Stamp()])
        trainer.train()
    return dict(steps_s=_step_times(stamps), peak_bytes=mem.peak_growth(),
                length=statistics.mean(lengths) if lengths else float("nan"))


def _child(args) -> None:
    """Run one contender and print its numbers as one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config.quiet()
    device = torch.device(args.device) if args.device else config.device()
    task = _task(args)
    if args.only == "refimpl":
        out = run_refimpl(device, args.shape, task, args.prompts, args.k, args.repeats)
    else:
        out = run_trl(device, args.shape, task, args.prompts, args.k, args.repeats, gvpo=args.only == "trl-gvpo")
    print("RESULT " + json.dumps(out | dict(threads=torch.get_num_threads(), device=str(device))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    parser.add_argument("--shape", default="toy", choices=shapes.SHAPES)
    parser.add_argument("--new-tokens", type=int, default=128, help="completion length (random-weight shapes)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every contender once, in turn")
    parser.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)  # one contender, in a child process
    args = parser.parse_args()
    if args.only:
        return _child(args)
    try:
        import trl
        contenders, trl_note = CONTENDERS, f"TRL {trl.__version__}"
    except ImportError:
        contenders, trl_note = CONTENDERS[:1], "trl is not installed: TRL contenders skipped"
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(args.rounds):  # contenders in turn (so that a slow spell hits all), the order rotating by round
        for name in contenders[r % len(contenders):] + contenders[: r % len(contenders)]:
            cmd = [sys.executable, __file__, "--only", name, "--prompts", str(args.prompts), "--k", str(args.k),
                   "--repeats", str(args.repeats), "--shape", args.shape, "--new-tokens", str(args.new_tokens)]
            cmd += (["--device", args.device] if args.device else []) + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"{name}: FAILED (exit {out.returncode})\n{out.stderr[-2000:]}")
                continue
            runs[name].append(json.loads(line[-1][len("RESULT "):]))
    results = {name: dict(r[0], step_s=statistics.median(t for x in r for t in x["steps_s"]),
                          peak_bytes=statistics.median(x["peak_bytes"] for x in r),
                          sample_s=statistics.median(x.get("sample_s", 0.0) for x in r)) for name, r in runs.items() if r}
    if "refimpl" not in results:
        sys.exit(1)
    base = results["refimpl"]
    n = args.prompts * args.k
    print(f"shape {args.shape}; device {base['device']} ({base['threads']} CPU threads), {args.prompts} prompts x k={args.k} = {n} "
          f"completions per step, mean completion length {base['length']:.1f} tokens; {trl_note}; "
          f"medians of {args.rounds} rounds x {args.repeats} steps (each after a warm-up step), each contender in its "
          "own process, in turn")
    # the ratio to refimpl per round (each round's median step), so its range shows the rounds' spread
    per_round = {name: [statistics.median(x["steps_s"]) / statistics.median(b["steps_s"])
                        for x, b in zip(r, runs["refimpl"])] for name, r in runs.items() if r}
    print(f"{'contender':10s} {'step (ms): median [range]':>30s} {'peak memory (MiB)':>18s} "
          f"{'time / refimpl: median [range over rounds]':>44s}")
    for name, r in results.items():
        steps = [t * 1e3 for x in runs[name] for t in x["steps_s"]]
        ratios = per_round[name]
        print(f"{name:10s} {r['step_s'] * 1e3:10.1f} [{min(steps):7.1f}, {max(steps):7.1f}] "
              f"{r['peak_bytes'] / 2**20:18.1f} {statistics.median(ratios):24.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
    print(f"sampling alone (anchor, refimpl process): {base['sample_s'] * 1e3:.1f} ms; "
          f"refimpl step / sampling: {base['step_s'] / base['sample_s']:.2f}")


if __name__ == "__main__":
    main()
