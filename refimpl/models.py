r"""Loading models: the project's own toy models, or any Hugging Face causal LM by name.

``load_model("refimpl/toy-arith")`` trains (once, deterministically) or loads from the cache a
small GPT-2 on the arithmetic corpus; ``load_model("refimpl/toy-exact")`` does the same for the
exact world's tiny model. Both are saved with ``save_pretrained`` and read back through
``AutoModelForCausalLM.from_pretrained`` -- the path a hub id takes -- so
``load_model("Qwen/Qwen2.5-0.5B")`` works the same way where the network is available.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import checks
from .config import Scale, cache_dir, device as pick_device, get_scale

__all__ = ["load_model", "toy_model_path", "pretrain", "TOY_MODELS"]

FORMAT_VERSION = 1  # bump when a toy model's recipe changes, so caches are rebuilt
TRAIN_THREADS = 2  # CPU threads used to train toy models (part of the recipe: see toy_model_path)


def pretrain(model, batches: Callable[[int], torch.Tensor], steps: int, lr: float, seed: int,
             warmup: int = 100) -> list[float]:
    """Next-token pretraining: AdamW, linear warmup then cosine decay, gradient clip 1.0.

    Args:
        batches: ``step -> [B, L]`` token ids (no padding; every position is trained).

    Returns:
        The loss at every step.
    """
    steps = checks.integer("steps", steps, low=1)
    warmup = checks.integer("warmup", warmup, low=1)
    lr = checks.real("lr", lr, low=0.0, low_open=True)
    torch.manual_seed(checks.integer("seed", seed))
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
    )
    # On CUDA the forward runs in bfloat16 autocast (weights and optimizer stay float32).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    losses = []
    for step in range(steps):
        ids = batches(step).to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())  # no host sync per step
    model.eval()
    return torch.stack(losses).float().tolist()


def _gpt2(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int, tokenizer, eos_id):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def _encode_lines(tok, lines: list[str]) -> torch.Tensor:
    """``tok(lines)["input_ids"]`` for a word-level tokenizer that splits on whitespace and adds
    ``<bos>``: a dictionary lookup, about 50 times faster on millions of lines (checked on a prefix)."""
    vocab, bos = tok.get_vocab(), [tok.bos_token_id]
    ids = torch.tensor([bos + [vocab[w] for w in line.split()] for line in lines])
    if not torch.equal(ids[:256], tok(lines[:256], return_tensors="pt")["input_ids"]):
        raise RuntimeError("fast corpus encoding disagrees with the tokenizer")
    return ids


def _build_arith(scale: Scale, out: Path, layers: int | None = None, width: int | None = None,
                 heads: int | None = None, steps: int | None = None, batch: int | None = None,
                 seed: int = 0, corpus_seed: int = 1234) -> dict:
    from .worlds import arith

    layers, width, heads = layers or scale.arith_layers, width or scale.arith_width, heads or scale.arith_heads
    steps, batch = steps or scale.arith_steps, batch or scale.arith_batch
    cfg = arith.ArithConfig()
    tok = arith.build_tokenizer(cfg)
    stop_id = tok.convert_tokens_to_ids(arith.STOP)
    torch.manual_seed(seed)
    model = _gpt2(len(tok), layers, width, heads, 32, tok, stop_id).to(pick_device(scale))
    lines = arith.corpus(steps * batch, seed=corpus_seed, cfg=cfg)
    data = _encode_lines(tok, lines).to(pick_device(scale))  # [n, L]: every line has the same length
    batches = lambda s: data[s * batch : (s + 1) * batch]
    losses = pretrain(model, batches, steps, lr=2e-3, seed=seed)
    model.to("cpu")
    model.generation_config.eos_token_id = stop_id  # sampling stops at ';'
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"final_loss": sum(losses[-50:]) / 50, "params": sum(p.numel() for p in model.parameters())}


def _build_arith_alt(scale: Scale, out: Path) -> dict:
    """A second, smaller arithmetic model (other seeds, other corpus draw): the Q-probe chapter's
    "API" embedder, a model that did not generate the samples it scores."""
    return _build_arith(scale, out, layers=max(2, scale.arith_layers - 1), width=scale.arith_width // 2,
                        heads=max(2, scale.arith_heads // 2), steps=scale.arith_steps * 2 // 3,
                        batch=scale.arith_batch // 2, seed=1, corpus_seed=4321)


def _build_exact(scale: Scale, out: Path) -> dict:
    from .worlds import exact

    tok = exact.build_tokenizer()
    torch.manual_seed(0)
    model = _gpt2(len(tok), 2, 32, 2, 16, tok, None)
    data = exact.corpus(n_lines=300 * 64, seed=7)  # [n, L] ids from a random Markov chain
    losses = pretrain(model, lambda s: data[s * 64 : (s + 1) * 64], 300, lr=3e-3, seed=0, warmup=20)
    model.generation_config.eos_token_id = None  # fixed-length completions: no stop token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"final_loss": sum(losses[-20:]) / 20, "params": sum(p.numel() for p in model.parameters())}


TOY_MODELS: dict[str, Callable[[Scale, Path], dict]] = {
    "refimpl/toy-arith": _build_arith,
    "refimpl/toy-arith-alt": _build_arith_alt,
    "refimpl/toy-exact": _build_exact,
}


def _remove_abandoned(path: Path) -> None:
    """Delete temporary build folders of ``path`` left by a process that no longer runs."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name[len(path.name) + 5:].split("-")[0]
        try:
            os.kill(int(pid), 0)  # raises if no such process
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def toy_model_path(name: str, scale: Scale | str | None = None) -> Path:
    """The cache folder of toy model ``name``, training it first if it is not there.

    On the CPU (always at the smoke scale) training is deterministic: seeded, single process,
    ``TRAIN_THREADS`` threads, so the same machine type gives the same weights. At the full scale it
    runs on :func:`refimpl.config.device` (a GPU when there is one) in bfloat16 autocast, which is seeded but
    not bit-reproducible across GPU models or library versions; the cache key records the device
    type only. The folder is written under a temporary name and renamed into place, so a crash or
    a concurrent build never leaves a half-written model.
    """
    if name not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; known: {sorted(TOY_MODELS)}")
    scale = scale if isinstance(scale, Scale) else get_scale(scale)
    scale_dep = name != "refimpl/toy-exact"  # the exact world's model is the same at every scale
    sizes = {k: v for k, v in scale.__dict__.items() if k.startswith("arith_")}  # what shapes the model
    recipe = [name, sizes if scale_dep else None, FORMAT_VERSION]
    if scale_dep and pick_device(scale).type != "cpu":  # other hardware, other weights
        recipe.append(pick_device(scale).type)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"{name.split('/')[-1]}-{scale.name if scale_dep else 'any'}-{key}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    threads = torch.get_num_threads()
    try:
        # CPU matmuls reduce in an order that depends on the thread count: pin it, so the weights
        # do not depend on what the caller (a notebook, a test) set.
        torch.set_num_threads(TRAIN_THREADS)
        info = TOY_MODELS[name](scale, tmp)
        (tmp / "refimpl_info.json").write_text(json.dumps({"name": name, "scale": scale.name, **info}, indent=1))
        try:
            os.replace(tmp, path)  # atomic on POSIX when path does not exist yet
        except OSError:
            if not (path / "config.json").exists():  # someone else won the race only if it's complete
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_model(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, scale: Scale | str | None = None):
    """(model, tokenizer) for a toy model name, a local folder, or a Hugging Face hub id.

    Remote code is never run (``trust_remote_code=False``): a folder or hub id that needs it fails.

    Args:
        name_or_path: ``"refimpl/toy-arith"``, ``"refimpl/toy-exact"``, a folder written by
            ``save_pretrained``, or a hub id such as ``"Qwen/Qwen2.5-0.5B"``.
        device: where to put the model (default :func:`refimpl.config.device`: CUDA if available).
        dtype: parameter dtype (default float32).
        scale: toy models only: ``"smoke"``/``"full"`` (default ``$REFIMPL_SCALE``).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and the tokenizer left-padding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    name = os.fspath(name_or_path)
    path = toy_model_path(name, scale) if name in TOY_MODELS else Path(name).expanduser()
    if not path.is_dir():
        looks_like_path = isinstance(name_or_path, os.PathLike) or name.startswith((".", "/", "~")) or "\\" in name
        if looks_like_path or name.count("/") > 1 or not name.strip():
            raise ValueError(f"name_or_path {name!r}: no model folder there, and it is not a hub id (org/name)")
        path = name  # a hub id: from_pretrained resolves it (network or the local hub cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {name!r} (not a model folder here; as a hub id: {e})") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # many hub models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device if device is not None else pick_device()).eval()
    return model, tokenizer
