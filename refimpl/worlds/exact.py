r"""The exact world: a real (tiny) transformer whose every completion can be enumerated.

Vocabulary ``{<pad>, a, b, c, d}`` (V = 5), prompts are the 16 two-letter strings over
``a..d``, completions are *all* V^L = 125 strings of length L = 3 (no stop token, so every
completion has exactly L tokens and the 125 probabilities sum to one). The model is a 2-layer
GPT-2 pretrained on a random Markov chain, so pi_ref is far from uniform. With
:meth:`ExactWorld.logp` every quantity of the book -- pi_ref, pi*, KL, E[r], log Z -- is computed
exactly through :func:`refimpl.lm.sequence_logprobs`, the same code that serves large models.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import checks, lm

__all__ = ["ExactWorld", "build_tokenizer", "corpus", "make_world", "LETTERS", "LENGTH"]

LETTERS = ["a", "b", "c", "d"]
VOCAB = ["<pad>"] + LETTERS
LENGTH = 3  # completion length L


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` over ``<pad> a b c d`` (no BOS/EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])  # no token_type_ids


def corpus(n_lines: int, seed: int, length: int = 2 + LENGTH) -> Tensor:
    """[n_lines, length] token ids from a random first-order Markov chain over ``a..d``."""
    g = torch.Generator().manual_seed(seed)
    n = len(LETTERS)
    trans = torch.rand(n, n, generator=g) ** 3  # cubing makes the rows peaked
    trans = trans / trans.sum(-1, keepdim=True)  # [n, n] row-stochastic
    x = torch.empty(n_lines, length, dtype=torch.long)
    x[:, 0] = torch.randint(n, (n_lines,), generator=g)
    for t in range(1, length):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x + 1  # shift past <pad>


@dataclass
class ExactWorld:
    """Prompts, the full completion support, and a reward table."""

    model: object  # the reference model pi_ref (a transformers causal LM)
    tokenizer: object
    prompts: list[str]  # P prompt texts
    completions: list[str]  # N = V^L completion texts ('_' stands for <pad>)
    completion_ids: Tensor  # [N, L] every completion, as token ids
    reward: Tensor  # [P, N] r(x, y) in [0, 1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_batch(self) -> tuple[Tensor, Tensor]:
        """[P, 2] prompt ids and mask."""
        enc = self.tokenizer(self.prompts, return_tensors="pt", padding=True).to(self.device)
        return enc["input_ids"], enc["attention_mask"]

    def logp(self, model=None) -> Tensor:
        """[P, N] exact log pi(y|x) of ``model`` (default: the reference model).

        Rows sum to one in probability: ``logp.logsumexp(-1) == 0``. Differentiable in ``model``.
        """
        model = self.model if model is None else model
        ids, mask = self.prompt_batch()
        P, N = ids.shape[0], self.completion_ids.shape[0]
        c = self.completion_ids.to(self.device)
        total, _ = lm.sequence_logprobs(
            model, ids.repeat_interleave(N, 0), mask.repeat_interleave(N, 0),
            c.repeat(P, 1), torch.ones_like(c).repeat(P, 1),
        )
        return total.view(P, N)  # [P*N] -> [P, N], prompt-major

    def completion_index(self, completion_ids: Tensor) -> Tensor:
        """Index in 0..N-1 of each row of ``completion_ids`` [B, L] (base-V digits)."""
        V = len(VOCAB)
        weights = V ** torch.arange(LENGTH - 1, -1, -1, device=completion_ids.device)
        return (completion_ids * weights).sum(-1)


def make_world(model, tokenizer, reward_seed: int = 0) -> ExactWorld:
    """The exact world around ``model`` (``load_model("refimpl/toy-exact")``) with a seeded reward
    table r(x, y) ~ Uniform[0, 1].

    Args:
        model, tokenizer: the exact world's model and tokenizer (vocabulary ``<pad> a b c d``).
        reward_seed: seed of the reward table.
    """
    tok = tokenizer
    if len(tok) != len(VOCAB) or tok.convert_ids_to_tokens(list(range(len(VOCAB)))) != VOCAB:
        raise ValueError(f"tokenizer must have the exact world's vocabulary {VOCAB}")
    reward_seed = checks.integer("reward_seed", reward_seed)
    prompts = ["".join(p) for p in itertools.product(LETTERS, repeat=2)]
    # itertools.product enumerates in base-V order, which completion_index inverts.
    ids = torch.tensor(list(itertools.product(range(len(VOCAB)), repeat=LENGTH)))
    texts = ["".join("_" if i == 0 else VOCAB[i] for i in row) for row in ids.tolist()]
    g = torch.Generator().manual_seed(reward_seed)
    reward = torch.rand(len(prompts), len(texts), generator=g)
    dev = next(model.parameters()).device
    return ExactWorld(model, tok, prompts, texts, ids.to(dev), reward.to(dev))
