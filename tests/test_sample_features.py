"""lm.sample(features_layer=L): the Q-probe features read while decoding equal lm.embed(layer=L,
before_last=True) on the same samples, on GPT-2 (the toy model) and random Llama / Qwen2 models."""
import pytest
import torch

from refimpl import lm
from refimpl.worlds import arith

from test_lm import _tiny

# Answers of 2, 3 and 4 tokens (stop token included): with max_new_tokens=3 the toy model stops the
# first prompt's rows and truncates the others; prompts of different lengths, so left padding.
PROMPTS = ["9 =", "1 2 + 3 4 =", "9 9 + 0 1 + 5 5 ="]
# Float32 rounding only: the KV-cached steps and embed's full pass multiply in different shapes
# (observed differences <= 3e-6 on states of size up to ~5; float32 resolution there is ~5e-7).
TOL = dict(atol=2e-5, rtol=1e-5)


def _embed(model, s, layer):
    return lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, layer=layer,
                    before_last=True)


def _hooks(model):
    """The forward (pre-)hooks on the model's modules. transformers installs its own on the first
    output_hidden_states call: one is made first, so that only the capture's could differ."""
    model(input_ids=torch.zeros(1, 1, dtype=torch.long), output_hidden_states=True)
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_features_equal_embed_before_last_on_gpt2(arith_model, one_thread, temperature):
    model, tok = arith_model
    stop, L, hooks = tok.convert_tokens_to_ids(arith.STOP), model.config.n_layer, _hooks(model)
    for layer in (0, 1, L // 2 + 1, L, -1):
        # k > 1, a batch_size that splits the 12 rows into chunks of 5, 5, 2
        s = lm.sample(model, tok, PROMPTS, k=4, max_new_tokens=3, seed=0, batch_size=5, temperature=temperature,
                      features_layer=layer)
        n = s.completion_mask.sum(1)
        assert s.contains([stop]).any() and (~s.contains([stop]) & (n == 3)).any()  # stopped and truncated rows
        assert (s.prompt_mask[:, 0] == 0).any()  # left-padded prompts
        assert s.features.dtype == torch.float32 and s.features.shape == (12, model.config.n_embd)
        torch.testing.assert_close(s.features, _embed(model, s, layer), **TOL)
        # and not the last token's state (what a capture one step late would read)
        last = lm.embed(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, layer=layer)
        assert (s.features - last).abs().amax(-1).min() > 1e-3
    assert _hooks(model) == hooks  # the capture's hooks are gone


def test_one_token_completions_give_the_last_prompt_token(arith_model, one_thread):
    model, tok = arith_model
    s = lm.sample(model, tok, PROMPTS, k=2, max_new_tokens=1, seed=0, features_layer=-1)
    assert (s.completion_mask.sum(1) == 1).all()
    torch.testing.assert_close(s.features, _embed(model, s, -1), **TOL)
    positions = (s.prompt_mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift them
    h = model(input_ids=s.prompt_ids, attention_mask=s.prompt_mask, position_ids=positions,
              output_hidden_states=True).hidden_states[-1]  # [B*k, P, d] the prompts alone
    torch.testing.assert_close(s.features, h[:, -1], **TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_features_equal_embed_before_last_on_random_llama_and_qwen2(arch, one_thread):
    tok = arith.build_tokenizer()
    model = _tiny(arch, tok)  # 2 blocks, d = 32, random weights: stops at random
    stop, hooks = tok.convert_tokens_to_ids(arith.STOP), _hooks(model)
    for temperature in (1.0, 0.0):
        for layer in (0, 1, 2, -1):
            s = lm.sample(model, tok, PROMPTS, k=8, max_new_tokens=6, seed=3, batch_size=10, temperature=temperature,
                          features_layer=layer)
            if temperature:
                n = s.completion_mask.sum(1)
                assert s.contains([stop]).any() and (~s.contains([stop]) & (n == 6)).any()
            torch.testing.assert_close(s.features, _embed(model, s, layer), **TOL)
    assert _hooks(model) == hooks  # the capture's hooks are gone


def test_capture_changes_nothing_sampled(arith_model, one_thread):
    model, tok = arith_model
    hooks = _hooks(model)
    plain = lm.sample(model, tok, PROMPTS, k=4, max_new_tokens=4, seed=7, batch_size=5)
    assert plain.features is None
    with_features = lm.sample(model, tok, PROMPTS, k=4, max_new_tokens=4, seed=7, batch_size=5, features_layer=2)
    assert torch.equal(plain.completion_ids, with_features.completion_ids) and plain.texts == with_features.texts
    assert _hooks(model) == hooks  # the capture's hooks are gone


def test_bad_features_layer(arith_model):
    model, tok = arith_model
    L = model.config.n_layer
    for bad, err in ((L + 1, ValueError), (-(L + 2), ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="features_layer"):
            lm.sample(model, tok, ["9 ="], features_layer=bad)


def test_hooks_are_removed_when_generate_fails(arith_model):
    model, tok = arith_model
    hooks = _hooks(model)

    def fail(input_ids, scores):
        raise RuntimeError("processor failed")

    with pytest.raises(RuntimeError, match="processor failed"):
        lm.sample(model, tok, ["9 ="], logits_processor=[fail], features_layer=1)
    assert _hooks(model) == hooks  # the capture's hooks are gone


def test_rows_and_prompts_carry_the_features(arith_model, one_thread):
    model, tok = arith_model
    s = lm.sample(model, tok, PROMPTS, k=2, max_new_tokens=3, seed=0, features_layer=-1)
    assert torch.equal(s.rows([5, 0, 3]).features, s.features[[5, 0, 3]])
    assert torch.equal(s.prompts([2]).features, s.features[4:6])
    with pytest.raises(ValueError, match="features"):
        lm.Samples(s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, s.texts, s.prompt_index, s.k,
                   s.features[:3])
