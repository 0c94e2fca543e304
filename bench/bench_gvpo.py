"""Benchmark: one GVPO training step on the arithmetic toy model, in completion tokens per second.

One step = k samples per prompt with the KV cache (``lm.sample``), one forward without grad for
the old policy and one for the reference, one forward + backward + AdamW step for the policy
(``refimpl.rl.train`` with ``steps=1``). The anchor, measured in the same run on the same
device, is sampling alone on the same batch, so the printed ratio (step / sampling) is
comparable across machines. TRL's ``GRPOTrainer`` (same model, batch, k, generation budget and
reference forward) is timed in the same run only if ``trl`` is installed.

    python bench/bench_gvpo.py [--device cuda] [--prompts 16] [--k 4] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import time_once  # noqa: E402

from refimpl import config, lm, load_model, rl  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config.quiet()
    device = torch.device(args.device) if args.device else config.device()
    ref, tok = load_model("refimpl/toy-arith", device=device)
    policy, _ = load_model("refimpl/toy-arith", device=device)
    prompts, targets = arith.prompts("train")
    prompts, targets = prompts[: args.prompts], targets[: args.prompts]
    cfg = rl.RLConfig(k=args.k, prompts_per_step=args.prompts, steps=1, lr=1e-6)

    tokens = []

    def step():
        log = rl.train(policy, ref, tok, prompts, targets, arith.reward, cfg)
        tokens.append(log.length[0] * args.prompts * args.k)

    def sample_only():
        lm.sample(policy, tok, prompts, k=args.k, max_new_tokens=cfg.max_new_tokens, seed=0)

    step(), sample_only()  # warm-up
    t_step = [time_once(step, device) for _ in range(args.repeats)]
    t_sample = [time_once(sample_only, device) for _ in range(args.repeats)]
    n_tok = statistics.median(tokens[1:])
    med_step, med_sample = statistics.median(t_step), statistics.median(t_sample)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {args.prompts} prompts x k={args.k}, {n_tok:.0f} completion tokens per step")
    print(f"GVPO step:     median {med_step * 1e3:8.1f} ms  ({n_tok / med_step:8.0f} tokens/s)")
    print(f"sampling only: median {med_sample * 1e3:8.1f} ms  (anchor)")
    print(f"ratio step / sampling: {med_step / med_sample:.2f}")
    try:
        import trl  # noqa: F401  optional benchmark dependency
    except ImportError:
        print("trl is not installed: GRPOTrainer comparison skipped")
        return
    t_trl = _trl_step_times(device, prompts, targets, args.prompts, args.k, args.repeats)
    med_trl = statistics.median(t_trl)
    print(f"TRL {trl.__version__} GRPOTrainer step: median {med_trl * 1e3:8.1f} ms  "
          f"({n_tok / med_trl:8.0f} tokens/s at the same completion length)")
    print(f"ratio TRL / refimpl step: {med_trl / med_step:.2f}")


def _trl_step_times(device, prompts, targets, P: int, k: int, repeats: int) -> list[float]:
    """Per-step wall times of TRL's GRPOTrainer on the same model, batch, k and generation budget.

    beta = 0.04 makes TRL run its reference forward too, as our step does; gradient checkpointing
    off, one generation per optimizer step. The first step is a warm-up and is dropped.
    """
    import tempfile
    import warnings

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy, tok = load_model("refimpl/toy-arith", device=device)
    data = Dataset.from_dict({"prompt": list(prompts) * (repeats + 1), "target": list(targets) * (repeats + 1)})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    def reward_fn(prompts, completions, target, **kw):
        return arith.reward(completions, target).tolist()

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=P * k, num_generations=k,
                         max_completion_length=8, max_steps=repeats + 1, beta=0.04, learning_rate=1e-6,
                         report_to="none", use_cpu=device.type == "cpu", save_strategy="no",
                         logging_steps=10_000, bf16=False, temperature=1.0, gradient_checkpointing=False,
                         disable_tqdm=True)
        trainer = GRPOTrainer(model=policy, reward_funcs=reward_fn, args=cfg, train_dataset=data,
                              processing_class=tok, callbacks=[Timer()])
        trainer.train()
    return times[1:]

if __name__ == "__main__":
    main()
