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
    assert config.default_device() == torch.device("cpu")


def test_mean_ci():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m, h = mean_ci(x)
    assert m.item() == 2.5
    assert abs(h.item() - 1.96 * x.double().std().item() / 2) < 1e-12
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci(torch.tensor([1.0]))
