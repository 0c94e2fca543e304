r"""Loading models: the project's own toy models, or any Hugging Face causal LM by name.

``load_model("refimpl/toy-arith")`` loads the small GPT-2 of the column-addition world that the
repository ships (``models/``, see :func:`shipped_dir`), or trains it (once, deterministically) and
caches it where there is no shipped copy or at another scale; ``TASK_MODELS`` lists the three
independently trained seeds the chapters use, ``REPLICATION_MODELS`` those three and three more
(``toy-arith-s3`` .. ``-s5``, the same recipe) for claims over base models,
``"refimpl/toy-arith-weak"`` and ``"refimpl/toy-arith-noverdict"`` are the helper embedders,
``VERDICT_FRACTION_MODELS`` the base recipe with verdicts on a share of the corpus lines (two seeds
per share), ``"refimpl/toy-exact"`` the exact world's tiny model. All are saved with ``save_pretrained`` and read back through
``AutoModelForCausalLM.from_pretrained`` -- the path a hub id takes -- so
``load_model("Qwen/Qwen2.5-0.5B")`` works the same way where the network is available.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import checks
from .config import SCALES, Scale, cache_dir, device as pick_device, get_scale

__all__ = ["load_model", "toy_model_path", "shipped_dir", "pretrain", "TOY_MODELS", "TASK_MODELS",
           "REPLICATION_MODELS", "VERDICT_FRACTION_MODELS"]

FORMAT_VERSION = 2  # bump when a toy model's recipe changes, so caches are rebuilt
TRAIN_THREADS = 2  # CPU threads used to train toy models (part of the recipe: see toy_model_path)


def pretrain(model, batches: Callable[[int], torch.Tensor], steps: int, lr: float, seed: int,
             warmup: int = 100, first_target: int | None = None) -> list[float]:
    """Next-token pretraining: AdamW, linear warmup then cosine decay, gradient clip 1.0.

    Args:
        batches: ``step -> [B, L]`` token ids (no padding).
        first_target: train only the tokens after the first occurrence of this id in each line
            (the arithmetic world's ``=``: its prompts are uniform noise, and fitting them only
            slows the model down); ``None`` trains every position.

    Returns:
        The loss at every step.
    """
    checks.instance("model", model, torch.nn.Module)
    if not callable(batches):
        raise TypeError(f"batches must be a function step -> [B, L] token ids, got {type(batches).__name__}")
    steps = checks.integer("steps", steps, low=1)
    warmup = checks.integer("warmup", warmup, low=1)
    lr = checks.real("lr", lr, low=0.0, low_open=True)
    V = model.get_input_embeddings().weight.shape[0]
    if first_target is not None:
        first_target = checks.integer("first_target", first_target, low=0, high=V - 1)
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
        ids = batches(step)
        checks.tensor(f"batches({step})", ids, dims=2, integral=True)
        labels = ids
        if first_target is not None:  # -100 (no loss) on the tokens up to and including the first `first_target`
            hit = ids == first_target
            labels = ids.masked_fill((hit.long().cumsum(1) == 0) | hit, -100)
        # on the batch's own device (the CPU, for the book's builds): no GPU sync
        if (min(ids.shape) < 1 or ids.shape[1] < 2 or int(ids.min()) < 0 or int(ids.max()) >= V
                or not bool((labels[:, 1:] != -100).any())):
            raise ValueError(f"batches({step}) must be token ids in [0, {V}) with at least one token to predict "
                             f"(L >= 2{', after first_target' if first_target is not None else ''}), got shape "
                             f"{tuple(ids.shape)}: a batch with nothing to predict trains to NaN weights")
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())  # no host sync per step
    model.eval()
    return torch.stack(losses).float().tolist()


def _save(model, tokenizer, out: Path) -> None:
    """save_pretrained both, the tokenizer as every supported transformers reads it: transformers 5
    writes the class "TokenizersBackend", which transformers 4 cannot load, and transformers 4 also
    returns ``token_type_ids`` (GPT-2 adds their embeddings) unless told the model's input names."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg |= {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _gpt2(vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int, tokenizer, eos_id):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


def _length_batches(tok, lines: list[str], batch: int, seed: int) -> list[torch.Tensor]:
    """Token ids in batches of equal-length lines (no padding), shuffled deterministically; each
    line is ``<bos>`` + one token per whitespace-separated word (checked against the tokenizer)."""
    vocab, bos = tok.get_vocab(), tok.bos_token_id
    by_len: dict[int, list[list[int]]] = {}
    for line in lines:
        by_len.setdefault(len(line.split()) + 1, []).append([bos] + [vocab[w] for w in line.split()])
    if tok(lines[:1])["input_ids"][0] != by_len[len(lines[0].split()) + 1][0]:
        raise RuntimeError("fast corpus encoding disagrees with the tokenizer")
    rng, out = random.Random(seed), []
    for length in sorted(by_len):
        group = by_len[length]
        rng.shuffle(group)
        out += [torch.tensor(group[s:s + batch]) for s in range(0, len(group) - batch + 1, batch)]
    rng.shuffle(out)
    return out


def _build_arith(scale: Scale, out: Path, seed: int = 0, kind: str = "base", verdict_fraction: float = 1.0) -> dict:
    """The task world's model: GPT-2 trained on the fallible writer's corpus (``kind="base"``), on
    a corpus without verdicts (``"noverdict"``: an embedder of another kind), or a smaller, shorter
    -trained model on the same kind of corpus (``"weak"``). Corpus seed 1000 + seed, init seed ``seed``;
    ``verdict_fraction``: the share of corpus lines that carry their verdict (``WorldConfig.verdict_fraction``)."""
    import dataclasses

    from .worlds import arith, writer

    layers, width, heads, steps, batch = (scale.arith_layers, scale.arith_width, scale.arith_heads,
                                          scale.arith_steps, scale.arith_batch)
    if kind == "weak":
        layers, width, heads, steps = max(1, layers - 1), width * 2 // 3, max(1, heads // 2), steps * 2 // 5
    cfg = dataclasses.replace(arith.WorldConfig(), verdict=kind != "noverdict", verdict_fraction=verdict_fraction)
    tok = arith.build_tokenizer()
    stop_id = tok.convert_tokens_to_ids(arith.STOP)
    lines = writer.corpus(int(steps * batch * 1.03) + 4 * batch, seed=1000 + seed, cfg=cfg)  # spare for remainders
    data = _length_batches(tok, lines, batch, seed)[:steps]
    torch.manual_seed(seed)
    model = _gpt2(len(tok), layers, width, heads, 24, tok, stop_id)
    model.config.activation_function = "gelu"  # exact GELU: one fused kernel, faster on a CPU
    torch.manual_seed(seed)
    model = type(model)(model.config).to(pick_device(scale))
    losses = pretrain(model, lambda s: data[s], steps, lr=2e-3, seed=seed,
                      first_target=tok.convert_tokens_to_ids("="))
    model.to("cpu")
    model.generation_config.eos_token_id = stop_id  # sampling stops at ';'
    model.generation_config.pad_token_id = tok.pad_token_id
    _save(model, tok, out)
    return {"kind": kind, "seed": seed, "corpus_seed": 1000 + seed, "layers": layers, "width": width, "heads": heads,
            "steps": steps, "batch": batch, "lr": 2e-3, "verdicts": cfg.verdict,
            **({"verdict_fraction": verdict_fraction} if verdict_fraction != 1 else {}),
            "final_loss": sum(losses[-50:]) / 50, "params": sum(p.numel() for p in model.parameters())}


def _build_exact(scale: Scale, out: Path) -> dict:
    from .worlds import exact

    tok = exact.build_tokenizer()
    torch.manual_seed(0)
    model = _gpt2(len(tok), 2, 32, 2, 16, tok, None)
    data = exact.corpus(n_lines=300 * 64, seed=7)  # [n, L] ids from a random Markov chain
    losses = pretrain(model, lambda s: data[s * 64 : (s + 1) * 64], 300, lr=3e-3, seed=0, warmup=20)
    model.generation_config.eos_token_id = None  # fixed-length completions: no stop token
    model.generation_config.pad_token_id = tok.pad_token_id
    _save(model, tok, out)
    return {"final_loss": sum(losses[-20:]) / 20, "params": sum(p.numel() for p in model.parameters())}


TOY_MODELS: dict[str, Callable[[Scale, Path], dict]] = {
    "refimpl/toy-arith": _build_arith,  # the task model, seed 0 (the chapters' default)
    "refimpl/toy-arith-s1": functools.partial(_build_arith, seed=1),
    "refimpl/toy-arith-s2": functools.partial(_build_arith, seed=2),
    "refimpl/toy-arith-s3": functools.partial(_build_arith, seed=3),  # s3-s5: replication seeds only
    "refimpl/toy-arith-s4": functools.partial(_build_arith, seed=4),
    "refimpl/toy-arith-s5": functools.partial(_build_arith, seed=5),
    "refimpl/toy-arith-weak": functools.partial(_build_arith, kind="weak"),
    "refimpl/toy-arith-noverdict": functools.partial(_build_arith, kind="noverdict"),
    "refimpl/toy-arith-noverdict-s1": functools.partial(_build_arith, seed=1, kind="noverdict"),
    **{f"refimpl/toy-arith-f{round(100 * f)}-s{s}": functools.partial(_build_arith, seed=s, verdict_fraction=f)
       for f in (0.1, 0.5) for s in range(2)},  # verdicts on a share f of the corpus lines (toy-arith-f10-s0, ...)
    "refimpl/toy-exact": _build_exact,
}
TASK_MODELS = ["refimpl/toy-arith", "refimpl/toy-arith-s1", "refimpl/toy-arith-s2"]  # independently trained seeds
# The base model is the unit of replication: six independently trained seeds of the same recipe
# (TASK_MODELS first). Claims about methods resample them (metrics.cluster_bootstrap).
REPLICATION_MODELS = TASK_MODELS + ["refimpl/toy-arith-s3", "refimpl/toy-arith-s4", "refimpl/toy-arith-s5"]
# The base recipe, seeds 0 and 1, by the share f of corpus lines that carried the checker's verdict (f = 0: none).
VERDICT_FRACTION_MODELS = {0.0: ("refimpl/toy-arith-noverdict", "refimpl/toy-arith-noverdict-s1"),
                           **{f: tuple(f"refimpl/toy-arith-f{round(100 * f)}-s{s}" for s in range(2)) for f in (0.1, 0.5)},
                           1.0: tuple(TASK_MODELS[:2])}


def shipped_dir() -> Path:
    """Where the repository keeps the smoke-scale models it ships: ``$REFIMPL_MODELS`` or
    ``models/`` beside the package (a clone or an editable install)."""
    return Path(os.environ.get("REFIMPL_MODELS") or Path(__file__).resolve().parents[1] / "models")


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


def toy_model_path(name: str, scale: Scale | str | None = None, shipped: bool = True) -> Path:
    """The folder of toy model ``name``: the shipped one at the smoke scale (``shipped_dir()``,
    when present and ``shipped``), else the cache folder, training the model first if needed.

    On the CPU (always at the smoke scale) training is deterministic: seeded, single process,
    ``TRAIN_THREADS`` threads, so the same machine type gives the same weights. At the full scale it
    runs on :func:`refimpl.config.device` (a GPU when there is one) in bfloat16 autocast, which is seeded but
    not bit-reproducible across GPU models or library versions; the cache key records the device
    type only. The folder is written under a temporary name and renamed into place, so a crash or
    a concurrent build never leaves a half-written model.
    """
    if not isinstance(name, str) or name not in TOY_MODELS:
        raise (ValueError if isinstance(name, str) else TypeError)(
            f"name must be a toy model, one of {sorted(TOY_MODELS)}; got {name!r}")
    shipped = checks.boolean("shipped", shipped)
    scale = scale if isinstance(scale, Scale) else get_scale(scale)
    scale_dep = name != "refimpl/toy-exact"  # the exact world's model is the same at every scale
    sizes = {k: v for k, v in scale.__dict__.items() if k.startswith("arith_")}  # what shapes the model
    smoke = {k: v for k, v in SCALES["smoke"].__dict__.items() if k.startswith("arith_")}
    if shipped and (sizes == smoke or not scale_dep) and (shipped_dir() / name.split("/")[-1] / "refimpl_info.json").exists():
        return shipped_dir() / name.split("/")[-1]  # the exact world's model is the same at every scale
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
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__} ({device!r})")
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
