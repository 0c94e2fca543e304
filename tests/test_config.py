"""refimpl.config and refimpl.metrics.mean_ci."""
import pytest
import torch

from refimpl import config
from refimpl.metrics import mean_ci


def test_scale_from_environment(monkeypatch):
    monkeypatch.delenv("REFIMPL_SCALE", raising=False)
    assert config.get_scale().name == "smoke"
    monkeypatch.setenv("REFIMPL_SCALE", "full")
    full = config.get_scale()
    assert full.name == "full" and full.arith_width > config.get_scale("smoke").arith_width
    monkeypatch.setenv("REFIMPL_SCALE", "nope")
    with pytest.raises(ValueError, match="REFIMPL_SCALE"):
        config.get_scale()


def test_cache_dir_and_device(monkeypatch, tmp_path):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    assert config.cache_dir() == tmp_path
    monkeypatch.setenv("REFIMPL_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")


def test_mean_ci_is_student_t():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m, h = mean_ci(x)
    assert m == 2.5
    assert abs(h - 3.182446305284263 * x.double().std().item() / 2) < 1e-9  # t_{0.975, 3}
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci(torch.tensor([1.0]))


def test_chapter_device(monkeypatch):
    monkeypatch.delenv("REFIMPL_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert config.device("smoke") == torch.device("cpu")  # smoke numbers are checked on CPU
    assert config.device("full") == torch.device("cuda")
    assert config.device() == torch.device("cuda")  # a model you load yourself goes to the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.device("full") == torch.device("cpu")
    monkeypatch.setenv("REFIMPL_DEVICE", "cpu")
    assert config.device("full") == torch.device("cpu")
    monkeypatch.delenv("REFIMPL_DEVICE")
    with pytest.raises(ValueError, match="scale"):
        config.device("huge")


def test_model_cache_key_ignores_chapter_only_sizes(monkeypatch, tmp_path):
    """Changing how long the chapters train policies must not retrain the pretrained models."""
    import dataclasses

    from refimpl import models

    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    base = config.get_scale("smoke")
    seen = []

    def fake_build(scale, out):
        seen.append(scale)
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setitem(models.TOY_MODELS, "refimpl/toy-arith", fake_build)
    a = models.toy_model_path("refimpl/toy-arith", base, shipped=False)
    b = models.toy_model_path("refimpl/toy-arith", dataclasses.replace(base, rl_steps=7, rl_seeds=1, seeds=9), shipped=False)
    c = models.toy_model_path("refimpl/toy-arith", dataclasses.replace(base, arith_width=64))  # not the shipped sizes
    assert a == b and a != c and len(seen) == 2
    chapter_only = dataclasses.replace(base, rl_steps=7, rl_seeds=1, seeds=9)
    assert models.toy_model_path("refimpl/toy-arith", chapter_only) == models.shipped_dir() / "toy-arith"  # shipped
    full = config.get_scale("full")
    monkeypatch.setattr(models, "pick_device", lambda scale=None: torch.device("cpu"))
    on_cpu = models.toy_model_path("refimpl/toy-arith", full)
    monkeypatch.setattr(models, "pick_device", lambda scale=None: torch.device("cuda"))
    on_gpu = models.toy_model_path("refimpl/toy-arith", full)
    assert on_cpu != on_gpu and len(seen) == 4  # weights trained on another device are another model
    with pytest.raises(ValueError, match="steps must be an int in"):
        models.pretrain(torch.nn.Linear(1, 1), lambda s: None, steps=0, lr=1e-3, seed=0)


def test_scale_overrides(monkeypatch):
    monkeypatch.setenv("REFIMPL_SCALE_OVERRIDES", "arith_layers=2, seeds=4")
    s = config.get_scale("full")
    assert (s.name, s.arith_layers, s.seeds, s.arith_width) == ("full", 2, 4, config.SCALES["full"].arith_width)
    for bad in ["nope=3", "seeds=0", "seeds=x", "seeds"]:
        monkeypatch.setenv("REFIMPL_SCALE_OVERRIDES", bad)
        with pytest.raises(ValueError, match="REFIMPL_SCALE_OVERRIDES"):
            config.get_scale("full")


def test_full_scale_grows_what_is_batched_and_keeps_sequential_steps_near_smoke():
    """The full scale is sized for one GPU call (see refimpl.config): larger wherever rows are batched
    (model, samples, batches, seeds), while the sequential step counts stay within a small factor of smoke's."""
    smoke, full = config.get_scale("smoke"), config.get_scale("full")
    for field in ("arith_layers", "arith_width", "arith_batch", "samples_per_prompt", "seeds", "rl_seeds", "rl_steps"):
        assert getattr(full, field) >= getattr(smoke, field), field
    assert full.arith_width > smoke.arith_width and full.samples_per_prompt > smoke.samples_per_prompt
    for field in ("arith_steps", "rl_steps"):
        assert getattr(full, field) <= 4 * getattr(smoke, field), field
