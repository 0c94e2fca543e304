"""Cost of scoring k candidates with a Q-probe (embed + probe) relative to generating them.

The anchor is the generation of the same candidates (``refimpl.lm.sample``), measured in the same
run on the same device; the script prints medians of several runs and the ratio, for the toy
arithmetic model (one forward pass over already-generated tokens against a decoding loop), and then
as a function of the completion length (``--lengths``) on a randomly initialized model of the same
shape with a longer context, decoding exactly L tokens (the paper's completions run to 300 tokens).

    python bench/bench_qprobe.py [--k 48] [--prompts 26] [--repeats 5] [--device cpu] [--lengths 4,16,64,256]
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
    ap.add_argument("--lengths", default="", help="completion lengths for a length sweep, e.g. 4,16,64,256 (default: none)")
    args = ap.parse_args()
    config.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("refimpl/toy-arith", device=args.device)
    device = next(model.parameters()).device
    xs, _ = arith.prompts("train")
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
    lengths = [int(v) for v in args.lengths.split(",") if v]
    if lengths:
        length_sweep(model, tok, xs, args.k, lengths, device, args.repeats)


def length_sweep(model, tok, xs, k: int, lengths: list[int], device: torch.device, repeats: int) -> None:
    """Ratio score / generate when every completion has exactly L tokens (no stop token)."""
    from transformers import GenerationConfig, GPT2LMHeadModel

    cfg = model.config.to_dict() | {"n_positions": max(lengths) + 32}
    torch.manual_seed(0)
    long = GPT2LMHeadModel(type(model.config).from_dict(cfg)).to(device).eval()
    enc = tok(xs, return_tensors="pt", padding=True).to(device)
    ids, attn = enc["input_ids"].repeat_interleave(k, 0), enc["attention_mask"].repeat_interleave(k, 0)
    probe = qprobe.QProbe(model.config.n_embd).to(device)
    print(f"length sweep: {len(xs)} prompts x k = {k}, random {model.config.n_layer}-layer model")
    for L in lengths:
        gen = GenerationConfig(do_sample=True, max_new_tokens=L, min_new_tokens=L, eos_token_id=None, top_k=0,
                               pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            t_gen, out = timed(lambda: long.generate(input_ids=ids, attention_mask=attn, generation_config=gen), device, repeats)
        comp = out[:, ids.shape[1]:]
        mask = torch.ones_like(comp)

        def score():
            phi = lm.embed(long, ids, attn, comp, mask, batch_size=256)
            with torch.no_grad():
                return resample.select(probe(phi).reshape(len(xs), k), 0.1)

        t_score, _ = timed(score, device, repeats)
        print(f"  L = {L:4d}: generate {t_gen * 1e3:9.1f} ms, embed + probe {t_score * 1e3:9.1f} ms, ratio {t_score / t_gen:.3f}")


if __name__ == "__main__":
    main()
