"""refimpl.models: deterministic toy training, the from_pretrained path, the cache."""
import json

import pytest
import torch

import refimpl
from refimpl import models


def test_toy_models_load_through_from_pretrained(arith_model):
    from transformers import PreTrainedTokenizerFast

    model, tok = arith_model
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.padding_side == "left"
    path = models.toy_model_path("refimpl/toy-arith")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    info = json.loads((path / "refimpl_info.json").read_text())
    assert info["params"] == sum(p.numel() for p in model.parameters())
    # A folder is accepted like a hub id and gives the same weights.
    again, _ = refimpl.load_model(str(path), device="cpu")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_toy_training_is_deterministic(tmp_path, monkeypatch):
    """Training the exact world's model twice from scratch gives bit-identical weights."""
    paths = []
    for i in range(2):
        monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / f"c{i}"))
        paths.append(models.toy_model_path("refimpl/toy-exact"))
    assert not list((tmp_path / "c0").glob("*.tmp-*"))  # no half-written folders left
    a, _ = refimpl.load_model(str(paths[0]), device="cpu")
    b, _ = refimpl.load_model(str(paths[1]), device="cpu")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_bad_names():
    with pytest.raises(ValueError, match="toy model"):
        models.toy_model_path("refimpl/toy-nope")
    with pytest.raises(TypeError, match="name_or_path"):
        refimpl.load_model(3)
    with pytest.raises(ValueError, match="REFIMPL_SCALE"):
        refimpl.get_scale("huge")


def test_toy_training_ignores_callers_thread_setting(tmp_path, monkeypatch):
    """Weights are the same whether the caller runs 1 thread or the default."""
    paths = []
    default = torch.get_num_threads()
    for i, threads in enumerate([1, default]):
        torch.set_num_threads(threads)
        monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / f"t{i}"))
        paths.append(models.toy_model_path("refimpl/toy-exact"))
        assert torch.get_num_threads() == threads  # restored after training
    torch.set_num_threads(default)
    a, _ = refimpl.load_model(str(paths[0]), device="cpu")
    b, _ = refimpl.load_model(str(paths[1]), device="cpu")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
