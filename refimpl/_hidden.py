r"""Reading a causal LM's hidden states with hooks (GPT-2, Llama, Qwen2): its blocks, its final norm,
and :class:`DecodeFeatures`, the Q-probe features phi(x, y) taken while ``generate`` decodes.

Layer i indexes ``output_hidden_states`` (transformers 5): 0 is the input of block 0 (the embedding
output), i < n_layers the input of block i (the output of block i - 1), n_layers (or -1) the output
of the final norm.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["final_norm", "n_layers", "DecodeFeatures"]


def _find(model, *names: str) -> torch.nn.Module | None:
    """The first of ``names`` that is a submodule of the base model (or of its ``.model``), else None."""
    base = getattr(model, "base_model", model)
    return next((getattr(m, n) for m in (base, getattr(base, "model", None)) for n in names
                 if isinstance(getattr(m, n, None), torch.nn.Module)), None)


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied after the last block (GPT-2 ``ln_f``, Llama/Qwen2 ``norm``), or None."""
    return _find(model, "ln_f", "norm")


def n_layers(model) -> int:
    """The number of blocks (``output_hidden_states`` has one entry more)."""
    return getattr(model.config, "num_hidden_layers", None) or model.config.n_layer


class DecodeFeatures:
    """phi(x, y) while decoding: per row, the state at ``layer`` of the token before its last real one.

    The step that samples completion token t runs a forward whose last position is token t-1 (the last
    prompt token at t = 0). A hook keeps that position's state h; this logits processor, called once
    per step after the forward, copies h into ``feat`` for the rows that have not emitted a stop token
    yet. After ``generate``, a row with n real completion tokens holds the state of token n-2 (the
    last prompt token when n = 1), stopped or truncated alike. Memory O(rows·d), no host sync.
    """

    def __init__(self, model, layer: int, stop: Tensor):
        blocks = _find(model, "h", "layers")
        if not isinstance(blocks, torch.nn.ModuleList) or final_norm(model) is None:
            raise ValueError(f"{type(model).__name__}: no blocks (h / layers) and final norm (ln_f / norm) to hook")
        self.stop, self.h, self.feat, self.alive = stop, None, None, None
        layer %= n_layers(model) + 1  # -1 is n_layers, as in output_hidden_states
        if layer == n_layers(model):  # the last entry: after the final norm
            self.hook = final_norm(model).register_forward_hook(lambda mod, args, out: self._keep(out))
        else:  # output_hidden_states[layer] is the input of block `layer`
            self.hook = blocks[layer].register_forward_pre_hook(
                lambda mod, args, kw: self._keep(args[0] if args else kw["hidden_states"]), with_kwargs=True)

    def _keep(self, h: Tensor) -> None:
        self.h = h[:, -1].float()  # [b, d] the last position of this step's forward

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.feat is None:  # first step: the last prompt token, every row alive
            self.feat = torch.zeros_like(self.h)
            self.alive = torch.ones(len(self.h), dtype=torch.bool, device=self.h.device)
        else:  # input_ids[:, -1] was sampled at the previous step
            self.alive &= ~torch.isin(input_ids[:, -1], self.stop)
        self.feat = torch.where(self.alive[:, None], self.h, self.feat)
        return scores  # unchanged

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()
