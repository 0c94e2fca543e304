"""The toy worlds: the answer parser, the writer's law, rewards, splits, tokenizers, the exact world's exactness."""
import random

import pytest
import torch

from refimpl.worlds import arith, exact, writer


@pytest.mark.parametrize("text,value", [
    ("5 3 1", 135), ("5 3 1 ;", 135), ("7", 7), ("0 0 0 ;", 0), (" 1  2 ", 21), ("9 9 1", 199),
])
def test_parse_answer_valid(text, value):
    assert arith.parse_answer(text) == value


@pytest.mark.parametrize("text", [
    "", ";", "5 3 1 0", "53 1", "5 + 3", "5 3 ; 1", "-5", "__import__('os')", "5 3 1 ; ;", "٣", "1e3",
])
def test_parse_answer_malformed_is_none(text):
    assert arith.parse_answer(text) is None


def test_parse_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="text"):
        arith.parse_answer(17)


def test_prompt_and_answer_text_units_first():
    assert arith.prompt_text(("+", 47, 85, 3)) == "4 7 + 8 5 + 0 3 ="
    assert arith.answer_text(135) == "5 3 1"
    assert arith.parse_answer(arith.answer_text(135)) == 135


def test_writer_law_is_a_distribution_and_matches_the_corpus():
    rng = random.Random(0)
    for _ in range(200):
        p = arith.draw_problem(rng, "sub" if rng.random() < 0.3 else "add")
        law = writer.writer_law(p)
        assert abs(sum(law.values()) - 1) < 1e-12 and all(v >= 0 for v in law)
        d = writer.difficulty(p)
        if d["carries"] == 0:  # nothing to forget: the writer is always right
            assert d["writer_accuracy"] == 1.0
    # the corpus' verdicts are the checker's, and its success rate is the writer's accuracy
    lines = writer.corpus(3000, seed=0)
    hits, expected = 0, 0.0
    for line in lines:
        prompt, rest = line.split(" = ")
        answer, verdict = rest.split(" ; ")
        words = prompt.split()
        ops = [int(words[i] + words[i + 1]) for i in range(0, len(words), 3)]
        problem = (words[2], *ops)
        ok = arith.parse_answer(answer) == arith.value(problem)
        assert verdict == ("Y <eos>" if ok else "N <eos>")
        assert not arith.is_held_out(problem)
        hits += ok
        expected += writer.writer_accuracy(problem)
    assert abs(hits - expected) < 4 * (len(lines) * 0.25) ** 0.5  # binomial, 4 sd


def test_verdict_fraction_thins_the_verdicts_and_nothing_else():
    """WorldConfig.verdict_fraction f: a line keeps its verdict with probability f (binomial, 4 sd), drawn
    from a stream of its own, so the problems and answers are the full corpus's; f = 1 (the default) is the
    corpus every shipped model was trained on, bit for bit, and f = 0 the corpus without verdicts."""
    import hashlib

    full = writer.corpus(2000, seed=1000)  # toy-arith's corpus seed: its first lines, hashed before f existed
    assert hashlib.sha256("\n".join(full).encode()).hexdigest()[:16] == "d314e9a2871b0de1"
    strip = lambda lines: [line.replace(" ; Y <eos>", " ; <eos>").replace(" ; N <eos>", " ; <eos>") for line in lines]  # noqa: E731
    assert writer.corpus(2000, seed=1000, cfg=arith.WorldConfig(verdict_fraction=1.0)) == full
    none = writer.corpus(2000, seed=1000, cfg=arith.WorldConfig(verdict_fraction=0.0))
    assert none == writer.corpus(2000, seed=1000, cfg=arith.WorldConfig(verdict=False)) == strip(full) != full
    for f in (0.1, 0.5):
        lines = writer.corpus(2000, seed=1000, cfg=arith.WorldConfig(verdict_fraction=f))
        assert all(line in (a, b) for line, a, b in zip(lines, full, strip(full)))  # a verdict kept is the checker's
        kept = sum(line != b for line, b in zip(lines, strip(full)))
        assert abs(kept - 2000 * f) < 4 * (2000 * f * (1 - f)) ** 0.5, (f, kept)
    rng = random.Random(0)  # corpus_line draws from the caller's rng
    assert {writer.corpus_line(("+", 1, 2), rng, arith.WorldConfig(verdict_fraction=0.5)) for _ in range(50)} == {
        "0 1 + 0 2 = 3 0 0 ; Y <eos>", "0 1 + 0 2 = 3 0 0 ; <eos>"}
    for bad in (dict(verdict_fraction=1.5), dict(verdict_fraction=-0.1), dict(verdict=False, verdict_fraction=0.5)):
        with pytest.raises(ValueError, match="verdict_fraction"):
            arith.WorldConfig(**bad)


def test_reward_and_hidden_score():
    r = arith.reward(["5 3 1 ;", "5 2 1 ;", "bad", "5 3 1"], [135, 135, 135, 135])
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0]
    s = arith.hidden_score(["5 3 1 ;", "5 2 1 ;", "bad", "0 0 0"], [135, 135, 135, 135])
    assert s.tolist() == [3.0, 2.0, -1.0, 0.0]
    assert torch.equal(r == 1, arith.hidden_score(["5 3 1 ;", "5 2 1 ;", "bad", "5 3 1"], [135] * 4) == 3)
    with pytest.raises(ValueError, match="targets"):
        arith.reward(["1"], [1, 2])


def test_preference_labels_follow_bradley_terry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.full((20000,), 1.0), torch.zeros(20000)
    lab = arith.preference_label(a, b, generator=g)
    assert abs(lab.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    with pytest.raises(ValueError, match="shape"):
        arith.preference_label(a, b[:3])


def test_splits_are_disjoint_deterministic_and_held_out():
    train, test, shifted = (arith.prompt_set(s, arith.SPLIT_SIZES[s]) for s in ("train", "test", "shifted"))
    assert len(set(train[0])) == 200 and len(set(test[0])) == 100 and len(set(shifted[0])) == 100
    assert not set(train[0]) & set(test[0])
    assert all(arith.is_held_out(p) for p in test[2] + shifted[2]) and not any(arith.is_held_out(p) for p in train[2])
    assert all(p[0] == "-" for p in shifted[2]) and all(p[0] == "+" for p in test[2])
    assert arith.prompts("test") == (test[0], test[1]) and arith.prompts("test", 10) == (test[0][:10], test[1][:10])
    with pytest.raises(ValueError, match="split"):
        arith.prompts("validation")


def test_existing_splits_are_unchanged():
    """Adding the validation split moved no prompt of the others (hashes of the prompts and values
    the chapters were run on, and of a longer test sequence)."""
    import hashlib

    expected = {("train", 200): "292d095c834fe4f4", ("test", 100): "e7cdbf5b8fc38bb0",
                ("shifted", 100): "6757502f5a852463", ("test", 300): "c85813f8332afdc0"}
    for (split, n), digest in expected.items():
        texts, values, _ = arith.prompt_set(split, n)
        assert hashlib.sha256(repr((texts, values)).encode()).hexdigest()[:16] == digest, (split, n)


def test_validation_split_is_held_out_disjoint_and_drawn_like_test():
    val, test, train = (arith.prompt_set(s, arith.SPLIT_SIZES[s]) for s in ("val", "test", "train"))
    assert arith.SPLIT_SIZES["val"] == 100 and len(set(val[0])) == 100 == len(val[1])
    assert not set(val[0]) & set(test[0]) and not set(val[0]) & set(train[0])
    assert all(arith.is_held_out(p) and p[0] == "+" for p in val[2])  # never in the corpus, additions
    assert [arith.value(p) for p in val[2]] == val[1] and [arith.prompt_text(p) for p in val[2]] == val[0]
    # the same sequence as test, after test's prompts; deterministic; a prefix for a smaller n
    assert arith.prompt_set("test", 200)[0] == test[0] + val[0] and arith.prompt_set("val", 100) == val
    assert arith.prompts("val", 7) == (val[0][:7], val[1][:7])
    with pytest.raises(ValueError, match="n must be an int"):
        arith.prompt_set("val", -1)


def test_tokenizer_roundtrip():
    tok = arith.build_tokenizer()
    ids = tok("4 7 + 8 5 = 2 3 1 ;")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 11
    assert tok.decode(ids[1:]) == "4 7 + 8 5 = 2 3 1 ;"


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
    s = lm.sample(model, tok, texts, k=16, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0)
    r = arith.reward(s.texts, s.expand(targets))
    v = arith.verdict_probability(model, tok, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    assert v[r == 1].mean() > v[r == 0].mean() + 0.3
    # the same verdict from the final hidden state at the stop token, without another forward pass
    h = lm.embed_layers(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)[:, -1]
    assert torch.allclose(arith.verdict_from_hidden(model, tok, h), v, atol=1e-5)
    with pytest.raises(ValueError, match="hidden"):
        arith.verdict_from_hidden(model, tok, h[:, :5])
