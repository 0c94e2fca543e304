"""The toy worlds: the safe evaluator, rewards, splits, tokenizers, the exact world's exactness."""
import random

import pytest
import torch

from refimpl.worlds import arith, exact


@pytest.mark.parametrize("text,value", [
    ("9 + 8", 17), ("9 + 8 ;", 17), ("20 - 3", 17), ("( 2 + 3 ) * 4", 20), ("2+3*4", 14),
    ("0", 0), ("007", 7), ("5 - 9", -4),
])
def test_evaluate_valid(text, value):
    assert arith.evaluate(text) == value


@pytest.mark.parametrize("text", [
    "", ";", "9 +", "+ 9", "9 8", "( 1 + 2", "1 + 2 )", "__import__('os')", "1 / 2", "2 ** 8",
    "1e9", "-5", "9 + 8 ; Y", "٣ + 1", "(" * 20 + "1" + ")" * 20, " + ".join(["1"] * 40), "9999999 * 9999999",
    "1 ; ;",
])
def test_evaluate_malformed_is_none(text):
    assert arith.evaluate(text) is None


def test_evaluate_rejects_non_strings():
    with pytest.raises(TypeError, match="text"):
        arith.evaluate(17)


def test_corpus_lines_have_correct_verdicts_and_rates():
    cfg = arith.ArithConfig()
    lines = arith.corpus(4000, seed=0, cfg=cfg)
    right = 0
    for line in lines:
        t, rest = line.split(" = ")
        expr, verdict = rest.split(" ; ")
        ok = arith.evaluate(expr) == int(t)
        assert verdict == ("Y <eos>" if ok else "N <eos>")
        right += ok
    # Half the first operands are even (P(right) = 0.7), half odd (0.3): about 0.5 overall.
    assert 0.45 < right / len(lines) < 0.55


def test_reward_and_hidden_score():
    r = arith.reward(["9 + 8", "9 + 7", "bad", "17"], [17, 17, 17, 17])
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0] and r.dtype == torch.float32
    s = arith.hidden_score(["9 + 8", "9 + 7", "bad", "100"], [17, 17, 17, 17])
    assert s.tolist() == [0.0, -1.0, -10.0, -10.0]
    with pytest.raises(ValueError, match="targets"):
        arith.reward(["1"], [1, 2])


def test_preference_labels_follow_bradley_terry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.full((20000,), 1.0), torch.zeros(20000)
    lab = arith.preference_label(a, b, generator=g)
    assert abs(lab.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
    with pytest.raises(ValueError, match="score_b"):
        arith.preference_label(a, b[:3])


def test_splits_are_disjoint_and_cover():
    split = arith.split_targets()
    assert not set(split["train"]) & set(split["test"])
    assert sorted(split["train"] + split["test"]) == list(range(arith.ArithConfig().max_number + 1))
    texts, targets = arith.prompts("test")
    assert texts[0] == f"{targets[0]} =" and len(texts) == len(split["test"])
    with pytest.raises(ValueError, match="split"):
        arith.prompts("validation")


def test_tokenizer_roundtrip():
    tok = arith.build_tokenizer()
    ids = tok("17 = 9 + 8 ; Y <eos>")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1:4]) == ["17", "=", "9"]
    assert tok.decode(ids[1:7]) == "17 = 9 + 8 ;"


def test_exact_world_is_exact(exact_world):
    w = exact_world
    logp = w.logp()
    assert logp.shape == (16, 125) and w.reward.shape == (16, 125)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(16), atol=1e-5, rtol=0)
    # pi_ref is far from uniform: its entropy is well below log 125.
    H = -(logp.exp() * logp).sum(-1)
    assert (H < 0.8 * torch.log(torch.tensor(125.0))).all()
    assert torch.equal(w.completion_index(w.completion_ids), torch.arange(125))


def test_exact_corpus_is_seeded():
    assert torch.equal(exact.corpus(10, seed=3), exact.corpus(10, seed=3))
    assert not torch.equal(exact.corpus(10, seed=3), exact.corpus(10, seed=4))


def test_pass_at_k_against_brute_force():
    import itertools

    from refimpl.metrics import pass_at_k

    n, c = 6, 2
    draws = list(itertools.combinations([1] * c + [0] * (n - c), 3))
    assert abs(pass_at_k(torch.tensor([c]), n, 3).item() - sum(map(any, draws)) / len(draws)) < 1e-12
    torch.testing.assert_close(pass_at_k(torch.tensor([0, 6, 3]), 6, 1), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="k"):
        pass_at_k(torch.tensor([1]), 6, 7)


def test_verdict_probability_separates_right_from_wrong(arith_model):
    """The pretrained model knows (at the stop token) whether its proposal is right."""
    from refimpl import lm

    model, tok = arith_model
    texts, targets = arith.prompts("test")
    s = lm.sample(model, tok, texts, k=16, max_new_tokens=8, seed=0)
    r = arith.reward(s.texts, [targets[i] for i in s.prompt_index.tolist()])
    v = arith.verdict_probability(model, tok, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    assert v[r == 1].mean() > v[r == 0].mean() + 0.3
