import os
from pathlib import Path

import pytest
import torch

# The tests never download: the hub libraries read these flags when they are imported (setting them
# later, e.g. with monkeypatch, leaves them retrying the network until a timeout).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tests train (or reuse) the toy models in the repository's own cache unless told otherwise.
os.environ.setdefault("REFIMPL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "refimpl"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def exact_world():
    from refimpl import load_model
    from refimpl.worlds import exact

    return exact.make_world(*load_model("refimpl/toy-exact", device="cpu"))


@pytest.fixture(scope="session")
def arith_model():
    from refimpl import config, load_model

    config.quiet()
    return load_model("refimpl/toy-arith", device="cpu")


@pytest.fixture
def one_thread():
    """One CPU thread for tests on tiny tensors (faster than two contending ones); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
