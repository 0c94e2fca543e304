"""Models of the shapes readers use, with random weights, built from a config (nothing is downloaded).

Timing a decoder depends on its shape (layers, width, heads, vocabulary), not on its weights, so
each benchmark can run on

* ``toy``: the book's arithmetic model (``refimpl/toy-arith``: 3 blocks of width 96, 18 tokens);
* ``gpt2-124m``: GPT-2 small (12 blocks of width 768, 12 heads, vocabulary 50,257);
* ``qwen2-0.5b``: Qwen2-0.5B (24 blocks of width 896, 14 query and 2 key-value heads, MLP 4,864,
  vocabulary 151,936, tied embeddings), the size of a Qwen2/Llama model used in RL post-training;
* ``cpu-gpt2`` and ``cpu-qwen2``: the same two families scaled down to run on a CPU in minutes
  (4 blocks of width 256), with their *real* vocabularies, so that the output layer and everything
  that touches a row of logits (sampling, processors, log-softmax) costs what it costs at full size.

The tokenizer is a word-level one over ``t0 … t{V-1}`` (one token per word), so that a prompt of n
words is n tokens and every sampled id decodes. ``eos`` is the last id; :func:`load` turns stopping
off in the model's generation config, so that every completion has exactly the requested length.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

SHAPES = ("toy", "cpu-gpt2", "cpu-qwen2", "gpt2-124m", "qwen2-0.5b")


def config(shape: str):
    """The transformers config of ``shape`` (not ``toy``)."""
    from transformers import GPT2Config, Qwen2Config

    gpt2 = dict(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256)
    qwen2 = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                 bos_token_id=151935, eos_token_id=151935)
    if shape == "gpt2-124m":
        return GPT2Config(n_layer=12, n_embd=768, n_head=12, **gpt2)
    if shape == "cpu-gpt2":
        return GPT2Config(n_layer=4, n_embd=256, n_head=4, **gpt2)
    if shape == "qwen2-0.5b":
        return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, **qwen2)
    if shape == "cpu-qwen2":
        return Qwen2Config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, **qwen2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def tokenizer(vocab_size: int):
    """A word-level tokenizer over ``t0 … t{V-1}``; the last id is eos and pad; pads on the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{vocab_size - 1}"
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=eos, unk_token="t0",
                                   padding_side="left")


def folder(shape: str, seed: int = 0) -> Path:
    """A checkpoint folder of ``shape`` (float32 random weights, seeded, and its tokenizer), written once
    under ``$REFIMPL_BENCH_CACHE`` (default ``~/.cache/refimpl/bench``) and reused, so that every process
    of a benchmark loads the same weights through ``from_pretrained``, as a hub id would be."""
    from transformers import AutoModelForCausalLM

    path = Path(os.environ.get("REFIMPL_BENCH_CACHE", Path.home() / ".cache" / "refimpl" / "bench")) / f"{shape}-{seed}"
    if not (path / "config.json").is_file():
        cfg = config(shape)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        tok = tokenizer(cfg.vocab_size)
        model.generation_config.eos_token_id = None  # exactly max_new_tokens per completion
        model.generation_config.pad_token_id = tok.pad_token_id
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if path.exists():  # another process wrote it meanwhile
            shutil.rmtree(tmp)
        else:
            tmp.replace(path)
    return path


def load(shape: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, tokenizer) of ``shape``: the model through :func:`refimpl.load_model` (eval mode, stopping
    turned off), the word-level tokenizer built here (``AutoTokenizer`` would pick the family's own
    class from the config's model type, whose pre-tokenizer splits the words differently)."""
    from refimpl import load_model

    if shape == "toy":
        return load_model("refimpl/toy-arith", device=device, dtype=dtype)
    model, _ = load_model(folder(shape, seed), device=device, dtype=dtype)
    return model, tokenizer(model.config.vocab_size)


def prompts(tok, n: int, length: int = 32, seed: int = 0) -> list[str]:
    """``n`` prompts of ``length`` random word-tokens each (eos excluded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok) - 1, (n, length), generator=g)
    return [" ".join(f"t{i}" for i in row) for row in ids.tolist()]


def describe(model) -> str:
    """One line: the architecture, its size and dtype."""
    n = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    c = model.config
    return (f"{type(model).__name__} with random weights: {c.num_hidden_layers} blocks of width {c.hidden_size}, "
            f"vocabulary {c.vocab_size}, {n / 1e6:.1f}M parameters, {str(dtype).replace('torch.', '')}")


def even_share(texts, targets=None) -> torch.Tensor:
    """A cheap stand-in reward for the random-weight shapes: the share of even token ids in each completion."""
    return torch.tensor([sum(int(w[1:]) % 2 == 0 for w in t.split()) / max(len(t.split()), 1) for t in texts])
