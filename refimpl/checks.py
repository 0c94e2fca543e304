"""Argument checks shared by every public function: one wording, one place.

Each check names the argument, says what was expected and what was given, and returns the
value in a canonical form (a Python ``int``/``float`` for numbers, so NumPy scalars are accepted
wherever Python numbers are). Bad input raises ``TypeError`` (wrong kind) or ``ValueError``
(right kind, wrong value); nothing is coerced silently.

Finiteness checks on tensors read one boolean back from the device; public functions call them
once on entry, and training loops call the unchecked private cores inside the loop. The device
check (:func:`same_device`) compares attributes only and reads no data.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["integer", "real", "beta", "probability", "boolean", "instance", "pair", "choice", "tensor", "nonempty", "same_shape", "same_device",
           "finite", "token_ids", "strings", "rewards", "generator", "device", "fits"]


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (either bound optional); bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return value


def real(name: str, value: Any, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a finite float in the interval (bounds optional, open or closed); NaN is rejected.

    ``allow_inf=True`` also accepts ``+inf`` where the upper bound allows it (e.g. "no clipping").
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise ValueError(f"{name} must be {'a finite number or +inf' if allow_inf else 'finite'}, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value:g}")
    return value


def beta(value: Any, name: str = "beta", allow_zero: bool = False) -> float:
    """A KL coefficient / temperature: finite and > 0 (or >= 0 with ``allow_zero``: the argmax)."""
    return real(name, value, low=0.0, low_open=not allow_zero)


def probability(name: str, value: Any) -> float:
    """A probability: a finite float in [0, 1]."""
    return real(name, value, low=0.0, high=1.0)


def boolean(name: str, value: Any) -> bool:
    """``value`` as a bool (Python or NumPy); anything else (a string, an int, None) is rejected."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return bool(value)


def instance(name: str, value: Any, cls: type) -> Any:
    """``value`` if it is an instance of ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__module__.split('.')[-1]}.{cls.__name__}, got {type(value).__name__}")
    return value


def pair(name: str, value: Any) -> tuple:
    """``value`` as a tuple if it is a sequence (not a string) of two items."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (a tuple of two), got {value!r}")
    return tuple(value)


def choice(name: str, value: Any, options: Iterable) -> Any:
    """``value`` if it is one of ``options``."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def tensor(name: str, value: Any, dims: int | Sequence[int] | None = None, min_dims: int = 0,
           floating: bool | None = None, integral: bool = False) -> Tensor:
    """``value`` if it is a tensor of the given rank and kind (floating point, or integer/bool)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if value.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(value.shape)}")
    if value.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dimensions, got shape {tuple(value.shape)}")
    if floating is True and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if integral and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value


def nonempty(name: str, value: Tensor) -> Tensor:
    """``value`` if it holds at least one element (no dimension of size 0): a mean over nothing is NaN."""
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def finite(name: str, value: Tensor, allow_neg_inf: bool = False) -> Tensor:
    """``value`` if it holds no NaN and no infinity (``-inf`` allowed with ``allow_neg_inf``:
    log-probabilities of impossible outcomes). Reads one boolean from the device."""
    if tensor(name, value).is_meta:
        raise ValueError(f"{name} is a meta tensor: it holds no values to check")
    bad = torch.isnan(value) | (torch.isposinf(value) if allow_neg_inf else torch.isinf(value))
    if bool(bad.any()):
        what = "NaN or +inf" if allow_neg_inf else "NaN or infinite values"
        raise ValueError(f"{name} must be finite{' or -inf' if allow_neg_inf else ''}, but holds {what}")
    return value


def same_shape(**tensors: Tensor) -> None:
    """Every tensor has the shape of the first one."""
    items = list(tensors.items())
    for name, t in items:
        tensor(name, t)
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}")


def lengths(name: str, value: Any, like: Tensor) -> Tensor:
    """``value`` if it is an integer tensor of ``like``'s shape and device with every entry >= 1
    (completion lengths in tokens). Reads one boolean from the device."""
    tensor(name, value, integral=True)
    same_shape(**{"the log-probabilities": like, name: value})
    same_device(**{"the log-probabilities": like, name: value})
    if bool((value < 1).any()):
        raise ValueError(f"{name} must be >= 1, got a minimum of {int(value.min())}")
    return value


def _same(a: torch.device, b: torch.device) -> bool:
    """One device: ``cuda`` (no index, as a generator may report it) matches any ``cuda:i``."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def same_device(**values: Tensor | torch.device | None) -> None:
    """Every tensor lives on the device of the first one (``None`` entries are skipped).

    A value may also be a ``torch.device``: a model's (``lm`` passes ``model=``), a generator's.
    Only attributes are compared: no data is read, so it fires before any computation (meta
    tensors included) and costs no host sync. Nothing is moved: tensors used together must be
    put on one device by the caller.
    """
    items = []
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, (Tensor, torch.device)):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        items.append((name, value if isinstance(value, torch.device) else value.device))
    for name, dev in items[1:]:
        if not _same(dev, items[0][1]):
            raise ValueError(f"{items[0][0]} ({items[0][1]}) and {name} ({dev}) must be on the same device")


def token_ids(name: str, value: Any, vocab_size: int | None = None) -> tuple[int, ...]:
    """A collection of token ids (ints, NumPy ints or an integer tensor) as a sorted tuple of
    distinct non-negative ints, each below ``vocab_size`` when it is given."""
    if isinstance(value, Tensor):
        tensor(name, value, integral=True)
        value = value.reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(value).__name__}")
    ids = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"{name} must contain ints, got {type(i).__name__} ({i!r})")
        ids.append(int(i))
    if any(i < 0 for i in ids):
        raise ValueError(f"{name} must be non-negative token ids, got {sorted(set(ids))}")
    if vocab_size is not None and any(i >= vocab_size for i in ids):
        raise ValueError(f"{name} {sorted(set(ids))} out of range for a vocabulary of {vocab_size}")
    return tuple(sorted(set(ids)))


def strings(name: str, value: Any, allow_empty: bool = False) -> list[str]:
    """A non-empty list (or tuple) of strings; a bare string is rejected (it would be iterated)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must contain only strings")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return list(value)


def rewards(value: Any, n: int, name: str = "reward_fn(texts, targets)") -> Tensor:
    """What a reward function returned: a finite 1-D tensor with one reward per completion."""
    tensor(name, value, dims=1)
    if value.shape[0] != n:
        raise ValueError(f"{name} must give one reward per completion ({n}), got {value.shape[0]}")
    return finite(name, value.float())


def generator(name: str, value: Any, device: torch.device | None = None) -> torch.Generator | None:
    """``None`` or a ``torch.Generator`` on the type of ``device`` (when given)."""
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    if device is not None and value.device.type != device.type:
        raise ValueError(f"{name} is on {value.device} but the tensors are on {device}")
    return value


def device(name: str, value: Any) -> torch.device:
    """``value`` (a ``torch.device`` or a string such as ``"cpu"``, ``"cuda:0"``) as a ``torch.device``."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a str or a torch.device, got {type(value).__name__} ({value!r})")
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"{name} is not a device: {value!r} ({e})") from None


def fits(name: str, out: Tensor, fix: str) -> Tensor:
    """A result ``out``, or a ``ValueError`` saying what to do (``fix``) when it holds NaN or +inf: a
    true value that does not fit the dtype. Reads one boolean from the device."""
    if bool(torch.isnan(out).any() | torch.isposinf(out).any()):
        raise ValueError(f"{name} is not finite in {out.dtype}: {fix}")
    return out
