"""Reliability, second audit: the classes of failure a wider review of the public API found.

Each test is one class of case, over every public function it concerns: empty inputs (zero rows,
an empty support), valid but extreme input (log-prob gaps of hundreds of nats, half-precision
values near 6e4, values near the float range, tiny temperatures), loops over a finite pool that
must stop with an error, boolean masks where indices are expected, and public helpers that used to
take anything. "Clear error" means a ``ValueError``/``TypeError`` whose message names the argument.
"""
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl import checks, grpo, gvpo, kl, lm, metrics, pools, qprobe, report, resample, rft
from refimpl.worlds import arith, writer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- empty inputs: an error, never the NaN of a mean over nothing ------------------------------------

EMPTY = [
    ("logp", lambda e: gvpo.gvpo_loss(e, e, e, 0.1)),
    ("logp", lambda e: gvpo.gvpo_weights(e, e, e, 0.1)),
    ("logp", lambda e: gvpo.gvpo_loss_terms(e, e, e, 0.1)),
    ("rewards", lambda e: grpo.group_advantages(e)),
    ("logp_tok", lambda e: grpo.grpo_loss(e[..., None], e[..., None], e[..., None], e)),
    ("logp_tok", lambda e: grpo.dr_grpo_loss(e[..., None], e[..., None], e[..., None], e)),
    ("q", lambda e: qprobe.mse_loss(e, e)),
    ("q", lambda e: qprobe.ce_loss(e, e)),
    ("q", lambda e: qprobe.pg_loss(e, e)),
    ("q_chosen", lambda e: qprobe.bt_loss(e, e)),
    ("q_chosen", lambda e: qprobe.hinge_loss(e, e)),
    ("q", lambda e: qprobe.chunk_expected_reward(e, e, 1, 0.1)),
]


@pytest.mark.parametrize("name, call", EMPTY, ids=[f"{i}-{n}" for i, (n, _) in enumerate(EMPTY)])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_groups_give_a_clear_error(name, call, shape):
    with pytest.raises((ValueError, TypeError), match=name if shape[1] else f"{name}|k|dimension|chunk"):
        call(torch.zeros(shape))


@pytest.mark.parametrize("call, name", [
    (lambda e: kl.optimal_policy(e, e, 0.5), "logp_ref"), (lambda e: kl.log_partition(e, e, 0.5), "logp_ref"),
    (lambda e: kl.kl_divergence(e, e), "logp"), (lambda e: resample.effective_sample_size(e), "log_w"),
    (lambda e: resample.resampling_law(e, e, [1, 2], 5), "log_proposal"), (lambda e: resample.selection_weights(e, 1.0), "scores"),
])
def test_an_empty_support_gives_a_clear_error(call, name):
    with pytest.raises(ValueError, match=name):
        call(torch.zeros(3, 0))


# --- valid but extreme input: finite, and right ------------------------------------------------------

@SETTINGS
@given(st.floats(-1e3, 1e3), st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       st.lists(st.floats(-5, 5), min_size=3, max_size=3))
def test_grpo_bounds_the_importance_ratio(gap, dtype, rewards):
    """Log-prob gaps of hundreds of nats: the ratio is exp of the log-ratio clamped to [-20, 20]."""
    logp = torch.zeros(1, 3, 2, dtype=dtype)
    logp[0, 0, 0] = gap
    old, mask, R = torch.zeros_like(logp), torch.ones_like(logp), torch.tensor([rewards], dtype=dtype)
    loss = grpo.grpo_loss(logp, old, mask, R, kl_coef=0.1, logp_ref_tok=old - gap)
    dr = grpo.dr_grpo_loss(logp, old, mask, R)
    assert torch.isfinite(loss) and torch.isfinite(dr)
    # float64 reference on the same (rounded) inputs
    g = logp.double().clamp(-grpo.RATIO_CLAMP, grpo.RATIO_CLAMP)
    adv = R.double() - R.double().mean()
    ratio = g.exp()
    surr = torch.minimum(ratio * adv[..., None], ratio.clamp(0.8, 1.2) * adv[..., None])
    torch.testing.assert_close(dr.double(), -surr.sum() / 6, rtol=2e-2, atol=1e-2 * max(1.0, float(adv.abs().max())))


@SETTINGS
@given(st.lists(st.floats(-6e4, 6e4), min_size=2, max_size=6), st.booleans())
def test_half_precision_group_advantages_are_finite_and_match_float64(values, scale):
    R = torch.tensor([values], dtype=torch.float16)
    adv = grpo.group_advantages(R, scale=scale)
    r = R.double()
    ref = (r - r.mean()) / (r.std() + 1e-4) if scale else r - r.mean()
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), ref, rtol=1e-4, atol=1e-3)


def test_float32_rewards_near_the_float_range():
    R = torch.tensor([[1e30, -1e30], [3e38, 3.3e38]])  # squares overflow float32; the advantages do not
    adv = grpo.group_advantages(R)
    assert torch.allclose(adv, torch.tensor([[0.7071, -0.7071], [-0.7071, 0.7071]]), atol=1e-3)
    assert torch.equal(grpo.group_advantages(R[:1] / 1e30), grpo._advantages(R[:1] / 1e30, True))
    with pytest.raises(ValueError, match="rewards"):  # the centred value itself does not fit float32
        grpo.group_advantages(torch.tensor([[3e38, -3e38, -3e38]]), scale=False)
    with pytest.raises(ValueError, match="overflows"):  # a loss of 1e60 does not fit float32: said, not inf
        gvpo.gvpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1e30, 0.0]]), 0.1)
    assert math.isclose(gvpo.gvpo_loss(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                                       torch.tensor([[1e30, 0.0]], dtype=torch.float64), 0.1).item(), 2.5e59, rel_tol=1e-9)
    with pytest.raises(ValueError, match="overflows"):
        gvpo.gvpo_loss_terms(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), 1e300)


@SETTINGS
@given(st.lists(st.floats(-300, 300), min_size=2, max_size=5), st.sampled_from([1e-3, 1.0, 30.0]))
def test_gvpo_in_half_precision_matches_float64(values, beta):
    k = len(values)
    logp = torch.tensor([values], dtype=torch.float16)
    R = torch.linspace(-1e3, 1e3, k, dtype=torch.float16)[None]
    a = torch.zeros_like(logp)
    for fn in (gvpo.gvpo_loss, gvpo.gvpo_weights, gvpo.gvpo_loss_terms):
        out, ref = fn(logp, a, R, beta), fn(logp.double(), a.double(), R.double(), beta)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


@SETTINGS
@given(st.lists(st.floats(-3e38, 3e38), min_size=1, max_size=6), st.sampled_from([torch.float32, torch.float64]))
def test_effective_sample_size_of_huge_log_weights(log_w, dtype):
    lw = torch.tensor(log_w, dtype=dtype)
    ess = resample.effective_sample_size(lw)
    x = lw.double() - lw.double().max()
    ref = torch.exp(2 * torch.logsumexp(x, 0) - torch.logsumexp(2 * x, 0))
    assert torch.isfinite(ess) and 1 - 1e-5 <= ess.item() <= len(log_w) + 1e-4
    torch.testing.assert_close(ess.double(), ref, rtol=1e-5, atol=0)


def test_effective_sample_size_keeps_the_plain_formula_for_ordinary_weights():
    lw = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(resample.effective_sample_size(lw),
                       torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1)))
    assert torch.isclose(resample.effective_sample_size(torch.tensor([6e4, 6e4], dtype=torch.float16)), torch.tensor(2.0))


def test_probe_losses_in_half_precision():
    q = torch.tensor([6e4, -6e4], dtype=torch.float16)
    for fn, other in ((qprobe.mse_loss, q.flip(0)), (qprobe.ce_loss, torch.tensor([0.0, 1.0], dtype=torch.float16)),
                      (qprobe.bt_loss, q.flip(0)), (qprobe.hinge_loss, q.flip(0))):
        out = fn(q, other)
        ref = fn(q.double(), other.double())
        assert out.dtype == torch.float32 and torch.isfinite(out)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="rewards"):
        qprobe.ce_loss(torch.zeros(2), torch.tensor([2.0, -1.0]))  # BCE targets outside [0, 1]


@SETTINGS
@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=8), st.sampled_from([1.0, 1e100, 1e200, 1e300, 1.7e308]))
def test_intervals_of_huge_values(xs, scale):
    """Values near 1e308: the intervals are those of the data divided by a power of two, scaled back."""
    x = torch.tensor(xs, dtype=torch.float64) * scale
    for fn in (metrics.mean_ci, lambda v: metrics.bootstrap_ci(v, n_boot=20)):
        try:
            iv = fn(x)
        except ValueError as e:  # only when the true half-width itself exceeds float64
            assert "overflows float64" in str(e) and scale > 1e300
            continue
        assert math.isfinite(iv.mean) and math.isfinite(iv.half) and math.isfinite(iv.se)
        small = fn(x / scale)
        assert math.isclose(iv.mean, small.mean * scale, rel_tol=1e-9, abs_tol=1e-300 * scale)
    if scale <= 1e300:
        d = metrics.paired_diff(x, -x)
        assert math.isfinite(d.mean) and math.isclose(d.mean, 2 * x.mean().item(), rel_tol=1e-9, abs_tol=1e-300 * scale)


def test_ordinary_intervals_keep_their_bits():
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    iv = metrics.mean_ci(x)
    assert iv.mean == x.reshape(3, -1).mean(1).mean().item()
    assert iv.se == x.reshape(3, -1).mean(1).std().item() / math.sqrt(3)


def test_pass_at_k_with_a_large_budget_matches_the_exact_ratio():
    n, k = 20000, 5000
    c = torch.tensor([0, 1, 3, 50, 15001, 20000])
    got = metrics.pass_at_k(c, n, k)
    exact = [1 - math.comb(n - ci, k) / math.comb(n, k) if n - ci >= k else 1.0 for ci in c.tolist()]
    torch.testing.assert_close(got, torch.tensor(exact, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="n_correct"):
        metrics.pass_at_k(torch.tensor([True, False]), 4, 2)  # a mask is not a count


def test_sequence_logprobs_at_extreme_temperatures(exact_world):
    ids, mask = exact_world.prompt_batch()
    c = exact_world.completion_ids[:16]
    cm = torch.tensor([[1, 1, 0]] * 16)  # padding with a token that may be impossible at T -> 0
    for T in (1e-40, 1e-3, 1e30):
        summed, per_token = lm.sequence_logprobs(exact_world.model, ids, mask, c, cm, temperature=T)
        assert not torch.isnan(per_token).any() and not torch.isposinf(per_token).any()
        assert (per_token[:, 2] == 0).all() and torch.equal(summed, per_token.sum(-1))
    logits = lm.forward(exact_world.model, ids, mask, c, cm).logits[:, ids.shape[1] - 1: -1].double()
    greedy = logits.argmax(-1) == c  # at T -> 0 a token has probability 1 if it is the argmax, else 0
    _, cold = lm.sequence_logprobs(exact_world.model, ids, mask, c, cm, temperature=1e-40)
    assert torch.equal(torch.isneginf(cold[:, :2]), ~greedy[:, :2])
    s = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:3], k=2, max_new_tokens=3,
                  temperature=1e-40)  # greedy in effect, and no NaN probabilities
    g = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:3], k=2, max_new_tokens=3, temperature=0)
    assert s.texts == g.texts


# --- loops over a finite pool stop with an error -----------------------------------------------------

def test_prompt_sets_refuse_more_prompts_than_exist():
    texts, _, problems = arith.prompt_set("shifted", 985)  # every held-out subtraction
    assert len(set(texts)) == 985 and all(p[0] == "-" for p in problems)
    with pytest.raises(ValueError, match="n=986"):
        arith.prompt_set("shifted", 986)
    with pytest.raises(ValueError, match="n="):
        arith.prompts("test", 10**5, arith.WorldConfig(operands=(2, 2)))  # 10^4 sums of two numbers
    with pytest.raises(ValueError, match="held_out_mod"):
        writer.corpus(3, 0, arith.WorldConfig(held_out_mod=1))  # every prompt held out: nothing to write


# --- public helpers that used to take anything -------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(p_forget_leading=1.5), "p_forget_leading"), (dict(p_forget_long=float("nan")), "p_forget_long"),
    (dict(p_forget_short=(0.1, 0.2, 0.3)), "p_forget_short"), (dict(p_forget_short=(0.1, -0.2)), "p_forget_short"),
    (dict(operands=(3, 2)), "operands"), (dict(operands=(1, 2)), "operands"), (dict(operands=(2, 20)), "operands"),
    (dict(held_out_mod=1), "held_out_mod"), (dict(verdict="yes"), "verdict"), (dict(subtraction_share=2.0), "subtraction_share"),
    (dict(p_carry_the_one=-0.1), "p_carry_the_one"), (dict(p_smaller_from_larger=True), "p_smaller_from_larger"),
])
def test_world_config_checks_its_fields(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        arith.WorldConfig(**kwargs)


def test_world_config_canonical_and_writer_law_a_distribution():
    cfg = arith.WorldConfig(operands=[2, 4], p_forget_short=[0.5, np.float64(0.25)], held_out_mod=np.int64(3))
    assert cfg.operands == (2, 4) and cfg.p_forget_short == (0.5, 0.25) and hash(cfg)
    rng = random.Random(0)
    for _ in range(20):
        p = arith.draw_problem(rng, rng.choice(["add", "sub"]), cfg)
        assert math.isclose(sum(writer.writer_law(p, cfg).values()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("problem", [("*", 1, 2), ("+", 100, 2), ("+", -1, 2), "1+2", ("-", 1, 2), ("+", 1),
                                     ("+", "1", 2), ("+", 1.0, 2), ("-", 5, 3, 1), ("+", True, 2), ()])
def test_problems_are_checked(problem):
    for fn in (arith.prompt_text, arith.value, arith.is_held_out, writer.writer_law, writer.writer_accuracy,
               writer.difficulty, lambda p: writer.corpus_line(p, random.Random(0)),
               lambda p: writer.writer_answer(p, random.Random(0))):
        with pytest.raises((ValueError, TypeError), match="problem"):
            fn(problem)


def test_arith_helpers_check_their_arguments():
    for v in (1000, -1, "12", 1.0, True):
        with pytest.raises((ValueError, TypeError), match="v"):
            arith.answer_text(v)
    with pytest.raises(TypeError, match="rng"):
        arith.draw_problem(3, "add")
    with pytest.raises(TypeError, match="cfg"):
        arith.prompt_set("train", 3, cfg="x")
    with pytest.raises(TypeError, match="seed"):
        writer.corpus(3, "a")
    with pytest.raises(ValueError, match="n_lines"):
        writer.corpus(-1, 0)
    with pytest.raises(ValueError, match="score_a"):
        arith.preference_label(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(ValueError, match="score_b"):
        arith.preference_label(torch.zeros(3), torch.zeros(2))


def test_lm_layout_helpers_check_their_arguments():
    logits = torch.randn(2, 5, 7)
    assert torch.equal(lm.completion_logits(logits, 2), logits[:, 1:-1])
    for width in (0, 6, 2.0, True):
        with pytest.raises((ValueError, TypeError), match="prompt_width"):
            lm.completion_logits(logits, width)
    with pytest.raises((ValueError, TypeError), match="logits"):
        lm.completion_logits(logits[0], 2)
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert lm.last_token_index(4, m).tolist() == [5, 3] and lm.last_token_index(4, m, before_last=True).tolist() == [4, 3]
    for bad, name in ((torch.tensor([[0, 1, 1]]), "completion_mask"), (2 * m, "completion_mask"), (m[0], "completion_mask"),
                      ([[1, 0]], "completion_mask"), (m.float(), "completion_mask")):
        with pytest.raises((ValueError, TypeError), match=name):
            lm.last_token_index(4, bad)
    with pytest.raises((ValueError, TypeError), match="prompt_width"):
        lm.last_token_index(0, m)
    with pytest.raises(TypeError, match="before_last"):
        lm.last_token_index(4, m, before_last="yes")


# --- boolean masks and indices -----------------------------------------------------------------------

def test_rows_and_prompts_take_boolean_masks_and_refuse_floats(exact_world):
    s = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:3], k=2, max_new_tokens=3, seed=0)
    mask = torch.tensor([False, True, False, False, True, True])
    assert s.rows(mask).texts == [s.texts[i] for i in (1, 4, 5)]
    assert s.rows(mask.tolist()).texts == s.rows([1, 4, 5]).texts
    assert s.prompts(torch.tensor([False, True, True])).texts == s.prompts([1, 2]).texts
    assert len(s.rows([])) == 0
    for bad, err in ((torch.tensor([True, False]), ValueError), (torch.tensor([1.7]), TypeError), ([0.5], TypeError),
                     ("ab", TypeError), ([6], ValueError), ([-1], ValueError)):
        with pytest.raises(err, match="index"):
            s.rows(bad)
    for bad in ([3], [-1], [0.5], torch.tensor([True])):
        with pytest.raises((ValueError, TypeError), match="which"):
            s.prompts(bad)
    pool = pools.Pool(s, torch.rand(3, 2), torch.randn(3, 2, 4))
    assert torch.equal(pool.prompts(torch.tensor([True, False, True])).rewards, pool.rewards[[0, 2]])
    for kwargs, name in ((dict(rewards=torch.rand(2, 3)), "rewards"), (dict(features=torch.randn(3, 3, 4)), "features"),
                         (dict(rewards=torch.full((3, 2), float("nan"))), "rewards"), (dict(samples="x"), "samples")):
        with pytest.raises((ValueError, TypeError), match=name):
            pools.Pool(**(dict(samples=s, rewards=torch.rand(3, 2), features=torch.randn(3, 2, 4)) | kwargs))


def test_samples_check_their_layout(exact_world):
    import dataclasses

    s = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:2], k=2, max_new_tokens=3, seed=0)
    for kwargs, name in ((dict(k=0), "k"), (dict(k=3), "k"), (dict(texts=s.texts[:1]), "texts"),
                         (dict(completion_mask=s.completion_mask[:, :1]), "completion_mask"),
                         (dict(prompt_ids=s.prompt_ids[:1], prompt_mask=s.prompt_mask[:1]), "prompt_ids"),
                         (dict(prompt_index=[0, 0, 1, 1]), "prompt_index"),
                         (dict(completion_ids=s.completion_ids.float()), "completion_ids")):
        with pytest.raises((ValueError, TypeError), match=name):
            dataclasses.replace(s, **kwargs)
    with pytest.raises(TypeError, match="values"):
        s.by_prompt([1, 2, 3, 4])
    with pytest.raises(TypeError, match="per_prompt"):
        s.expand(3)


# --- objects that must differ, and trainers with nothing to learn -------------------------------------

def test_dpo_finetuning_needs_a_separate_reference(exact_world):
    s = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:2], k=2, max_new_tokens=3, seed=0)
    with pytest.raises(ValueError, match="ref"):
        rft.finetune_dpo(exact_world.model, exact_world.model, s, torch.tensor([0]), torch.tensor([1]), 0.1, 1)


def test_pretrain_refuses_a_batch_with_nothing_to_predict(exact_world):
    import copy

    from refimpl import models

    model = copy.deepcopy(exact_world.model)
    before = [p.detach().clone() for p in model.parameters()]
    V = model.get_input_embeddings().weight.shape[0]
    for batches, kw, name in ((lambda step: torch.tensor([[1, 2, 3, 4]]), dict(first_target=4), "batches"),
                              (lambda step: torch.zeros(1, 1, dtype=torch.long), {}, "batches"),
                              (lambda step: torch.zeros(1, 4), {}, "batches"),
                              (lambda step: torch.full((1, 4), V), {}, "batches"),
                              (3, {}, "batches"), (lambda step: torch.zeros(1, 4, dtype=torch.long), dict(first_target=-3),
                                                   "first_target")):
        with pytest.raises((ValueError, TypeError), match=name):
            models.pretrain(model, batches, steps=2, lr=1e-3, seed=0, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any step


# --- small checks ------------------------------------------------------------------------------------

def test_checks_and_report_refuse_what_they_cannot_read():
    with pytest.raises(TypeError, match="x"):
        checks.finite("x", [1.0])
    with pytest.raises(TypeError, match="b"):
        checks.same_shape(a=torch.zeros(2), b=[1, 2])
    with pytest.raises(ValueError, match="x"):
        checks.finite("x", torch.zeros(2, device="meta"))
    with pytest.raises(TypeError, match="generator"):
        resample.select(torch.zeros(3), 1.0, generator=3)
    rep = report.Report("c", out=None)
    for holds in ("yes", torch.tensor([True, False]), [True]):
        with pytest.raises(TypeError, match="holds"):
            rep.claim("t", holds)
    rep.claim("t", torch.tensor(True)), rep.claim("t", np.bool_(True)), rep.claim("t", 1 < 2)
    for kwargs, name in ((dict(mean="a", half=1.0), "mean"), (dict(mean=0.0, half=-1.0), "half"),
                         (dict(mean=0.0, half=1.0, se=-1.0), "se"), (dict(mean=0.0, half=1.0, unit=3), "unit")):
        with pytest.raises((ValueError, TypeError), match=name):
            metrics.Interval(**kwargs)
    assert math.isnan(metrics.Interval(float("nan"), 1.0).mean)  # NaN stays reportable
