"""Bad input gets a clear error naming the argument; valid input gives a finite, correct result.

Two parts: property-based tests (hypothesis) over the public API -- random shapes, dtypes and
extreme values must give "a ValueError/TypeError, or a finite result that matches a float64
reference" -- and one regression test per failure the reliability review found.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl import checks, grpo, gvpo, idle, kl, lm, metrics, qprobe, report, resample, rl
from refimpl import bestofn, constraints, dpo, frontier, klest, klpg, particles, smc, tabular, twist
from refimpl.worlds import arith, writer
from refimpl.rl import RLConfig

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CLEAR = (ValueError, TypeError)


def _tensor(draw, shape, dtype, scale):
    x = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=math.prod(shape), max_size=math.prod(shape)))
    return (torch.tensor(x, dtype=torch.float64).reshape(shape) * scale).to(dtype)


@st.composite
def scores_and_beta(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(FLOATS))
    scale = draw(st.sampled_from([1.0, 10.0, 1e4, 6e4 if dtype == torch.float16 else 1e30]))
    beta = draw(st.sampled_from([0.0, 1e-30, 1e-4, 0.1, 1.0, 1e6, 1e30]))
    return _tensor(draw, shape, dtype, scale), beta


# --- properties ---------------------------------------------------------------------------------

@SETTINGS
@given(scores_and_beta())
def test_selection_weights_finite_normalized_and_correct(args):
    q, beta = args
    p = resample.selection_weights(q, beta)
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.double().sum(-1), torch.ones(q.shape[:-1], dtype=torch.float64), atol=1e-5, rtol=0)
    q64 = q.double()
    ref = torch.nn.functional.one_hot(q64.argmax(-1), q.shape[-1]).double() if beta == 0 else \
        torch.softmax((q64 - q64.amax(-1, keepdim=True)) / beta, -1)
    torch.testing.assert_close(p.double(), ref, atol=1e-5, rtol=1e-4)
    v = torch.arange(q.shape[-1], dtype=torch.float32).expand(q.shape)
    e = resample.expected_value(q, v, beta)
    assert torch.isfinite(e).all() and (e >= -1e-4).all() and (e <= q.shape[-1] - 1 + 1e-4).all()


@st.composite
def support_problem(draw):
    N = draw(st.integers(1, 6))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    logits = _tensor(draw, lead + (N,), torch.float64, 20.0)
    if draw(st.booleans()) and N > 1:  # some outcomes impossible under pi_ref
        logits[..., 0] = -math.inf
    reward = _tensor(draw, lead + (N,), torch.float64, draw(st.sampled_from([1.0, 1e3, 1e30])))
    beta = draw(st.sampled_from([1e-6, 0.1, 1.0, 1e6]))
    return torch.log_softmax(logits, -1).to(dtype), reward.to(dtype), beta


@SETTINGS
@given(support_problem())
def test_kl_optimum_is_finite_normalized_and_matches_float64(args):
    logp_ref, reward, beta = args
    try:
        logp = kl.optimal_policy(logp_ref, reward, beta)
        log_z = kl.log_partition(logp_ref, reward, beta)
    except ValueError as e:  # only when r/beta does not fit the dtype
        assert "overflows" in str(e)
        return
    assert not torch.isnan(logp).any() and torch.isfinite(log_z).all()
    assert torch.isneginf(logp[torch.isneginf(logp_ref)]).all()  # no mass off the support
    torch.testing.assert_close(logp.double().logsumexp(-1), torch.zeros(log_z.shape, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    r64 = reward.double().masked_fill(torch.isneginf(logp_ref), -math.inf)  # only the support counts
    ref = torch.log_softmax(logp_ref.double() + (r64 - r64.amax(-1, keepdim=True)) / beta, -1)
    torch.testing.assert_close(logp.double().exp(), ref.exp(), atol=1e-4, rtol=1e-3)
    J = kl.regularized_objective(logp, logp_ref, reward, beta)
    assert torch.isfinite(J).all()


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 6), st.sampled_from([1e-3, 0.1, 10.0]), st.sampled_from([1.0, 1e3]),
       st.sampled_from([torch.float32, torch.float64]))
def test_group_losses_are_finite_and_gvpo_weights_centre(P, k, beta, scale, dtype):
    g = torch.Generator().manual_seed(P * 10 + k)
    logp = (-scale * torch.rand(P, k, generator=g)).to(dtype)
    anchor = (-scale * torch.rand(P, k, generator=g)).to(dtype)
    R = (scale * torch.randn(P, k, generator=g)).to(dtype)
    loss = gvpo.gvpo_loss(logp, anchor, R, beta)
    assert torch.isfinite(loss) and loss >= 0
    w = gvpo.gvpo_weights(logp, anchor, R, beta)
    assert torch.isfinite(w).all() and w.sum(1).abs().max() <= 1e-4 * max(1.0, scale / beta * scale)
    tok = logp.unsqueeze(-1).expand(P, k, 3).contiguous()
    mask = torch.ones_like(tok)
    assert torch.isfinite(grpo.grpo_loss(tok, tok, mask, R, kl_coef=0.1, logp_ref_tok=anchor.unsqueeze(-1).expand_as(tok)))
    assert torch.isfinite(grpo.dr_grpo_loss(tok, tok, mask, R))
    assert torch.isfinite(qprobe.pg_loss(logp, R, beta)) and torch.isfinite(qprobe.ce_loss(logp, (R > 0).to(dtype)))


@SETTINGS
@given(st.lists(st.integers(0, 10), min_size=1, max_size=8), st.integers(1, 10))
def test_pass_at_k_bounded_and_monotone(counts, k):
    n = 10
    c = torch.tensor(counts)
    vals = [metrics.pass_at_k(c, n, j) for j in range(1, k + 1)]
    assert all(((v >= 0) & (v <= 1)).all() for v in vals)
    assert all((b >= a - 1e-12).all() for a, b in zip(vals, vals[1:]))


@SETTINGS
@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=12))
def test_intervals_are_finite_and_cover_the_mean(xs):
    i = metrics.mean_ci(xs)
    assert math.isfinite(i.mean) and math.isfinite(i.half) and i.half >= 0
    b = metrics.bootstrap_ci(xs, n_boot=50)
    assert math.isfinite(b.half) and abs(b.mean - i.mean) <= 1e-6 * max(1.0, abs(i.mean))


@SETTINGS
@given(st.integers(2, 5), st.integers(1, 3), st.integers(1, 6), st.floats(-1e6, 1e6), st.data())
def test_cluster_bootstrap_is_finite_and_brackets_the_grand_mean(M, S, P, scale, data):
    x = torch.tensor(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=M * S * P, max_size=M * S * P)),
                     dtype=torch.float64).view(M, S, P) * scale
    iv = metrics.cluster_bootstrap(x, n_boot=50)
    assert math.isfinite(iv.half) and iv.half >= 0 and math.isfinite(iv.se)
    assert abs(iv.mean - x.mean().item()) <= 1e-9 * max(1.0, abs(scale))
    assert iv.half <= (x.max() - x.min()).item() * (1 + 1e-9) + 1e-12  # every bootstrap mean lies in [min, max]


@SETTINGS
@given(st.integers(2, 30), st.sampled_from(FLOATS), st.data())
def test_exclude_and_renormalize_is_a_distribution_on_the_allowed_set(V, dtype, data):
    logits = _tensor(data.draw, (3, V), dtype, data.draw(st.sampled_from([1.0, 30.0, 1e4])))
    banned = data.draw(st.lists(st.integers(0, V - 1), unique=True, max_size=V - 1))
    out = idle.exclude_and_renormalize(logits, np.array(banned, dtype=np.int64))
    assert torch.isneginf(out[:, banned]).all() if banned else True
    allowed = [i for i in range(V) if i not in banned]
    assert torch.isfinite(out[:, allowed]).all()
    torch.testing.assert_close(out.exp().sum(-1).double(), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


# --- malformed inputs: only clear errors ------------------------------------------------------------

JUNK = [None, "0.1", [1.0, 2.0], float("nan"), float("inf"), -1, 0, True, torch.tensor(1.0),
        torch.tensor([1, 2]), torch.tensor([[float("nan"), 0.0]]), torch.zeros(0), torch.zeros(2, 0),
        np.float64(np.nan), object()]


def _cases():
    f = torch.randn(3, 4, dtype=torch.float64)
    r = torch.rand(3, 4, dtype=torch.float64)
    lp = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    feats = torch.randn(2, 4, 5)
    tok = torch.randn(3, 4, 3, dtype=torch.float64)  # [P, k, T] per-token log-probs
    world = klest.sequence_world(vocab=2, length=2)
    return [
        (kl.optimal_policy, dict(logp_ref=lp, reward=r, beta=0.5)),
        (kl.log_partition, dict(logp_ref=lp, reward=r, beta=0.5)),
        (kl.kl_divergence, dict(logp=lp, logq=lp)),
        (kl.total_variation, dict(logp=lp, logq=lp)),
        (resample.selection_weights, dict(scores=f, beta=0.5)),
        (resample.expected_value, dict(scores=f, values=r, beta=0.5)),
        (resample.resampling_law, dict(log_proposal=lp, log_w=f, ks=[1, 2], n_mc=10)),
        (resample.effective_sample_size, dict(log_w=f)),
        (qprobe.pg_loss, dict(q=f, rewards=r, beta=1.0)),
        (qprobe.mse_loss, dict(q=f, rewards=r)),
        (qprobe.chunk_expected_reward, dict(q=f, rewards=r, k=2, beta=0.1)),
        (qprobe.train_probe, dict(features=feats, rewards=torch.rand(2, 4), loss="pg", chunk_size=2, epochs=1)),
        (gvpo.gvpo_loss, dict(logp=f, logp_anchor=f, rewards=r, beta=0.1)),
        (gvpo.gvpo_weights, dict(logp=f, logp_anchor=f, rewards=r, beta=0.1)),
        (grpo.group_advantages, dict(rewards=r)),
        (metrics.pass_at_k, dict(n_correct=torch.tensor([0, 2]), n=4, k=2)),
        (metrics.mean_ci, dict(x=[1.0, 2.0, 3.0])),
        (metrics.cluster_bootstrap, dict(x=f, n_boot=20)),
        (metrics.decide, dict(interval=metrics.Interval(0.1, 0.05, se=0.02), threshold=0.0, direction=">")),
        (metrics.auc, dict(scores=torch.tensor([0.1, 0.9, 0.5]), labels=torch.tensor([0, 1, 1]))),
        (idle.exclude_and_renormalize, dict(logits=torch.randn(2, 5), banned_ids=[1])),
        (bestofn.best_of_n_law, dict(logp=lp, scores=r, n=3)),
        (bestofn.best_of_n_kl_bound, dict(n=4)),
        (bestofn.rejection_acceptance, dict(logp_ref=lp, reward=r, beta=0.5, r_max=1.0)),
        (bestofn.rejection_sample, dict(logp_ref=lp, reward=r, beta=0.5, r_max=1.0, n=5)),
        (dpo.dpo_loss, dict(logp_chosen=f[0], logp_rejected=f[1], logp_ref_chosen=f[2], logp_ref_rejected=lp[0], beta=0.1)),
        (dpo.preference_pairs, dict(logp_ref=lp, reward=r, n_pairs=4, label_temperature=0.5)),
        (dpo.preference_table, dict(logp_ref=lp, reward=r, label_temperature=0.5)),
        (dpo.pair_table, dict(pairs=dpo.Pairs(torch.tensor([[0, 1]]), torch.tensor([[2, 1]])), n_outcomes=4)),
        (dpo.dpo_population_loss, dict(logp=lp, logp_ref=lp, reward=r, beta=0.5)),
        (dpo.train_dpo_tabular, dict(logp_ref=lp, pairs=dpo.preference_table(lp, r), beta=0.5, steps=2, lr=1.0)),
        (klpg.kl_estimators, dict(logp=lp, logp_ref=f)),
        (klpg.rloo_advantages, dict(rewards=r)),
        (klpg.kl_pg_loss, dict(logp=lp, logp_ref=f, rewards=r, beta=0.1, estimator="k3_loss")),
        (klpg.expected_gradient, dict(logits=f, logp_ref=lp, reward=r, beta=0.1, estimator="k2_loss")),
        (klpg.forward_kl_optimum, dict(logp_ref=lp, reward=r, beta=0.5)),
        (tabular.train_tabular, dict(logp_ref=lp, reward=r, config=RLConfig(loss="kl_pg", beta=0.5, k=2, steps=2, lr=1.0))),
        (bestofn.rejection_law, dict(logp_ref=lp, reward=r, beta=0.5, r_max=1.0, n=3)),
        (smc.soft_values, dict(logp=lp, reward=r, beta=0.5, vocab_size=2)),
        (smc.guided_law, dict(logp=lp, log_psi=smc.soft_values(lp, r, 0.5, 2), vocab_size=2)),
        # the second audit's additions (issue 28): every public function of the modules it covered
        (resample.select, dict(scores=f, beta=0.5)),
        (gvpo.gvpo_loss_terms, dict(logp=f, logp_anchor=f, rewards=r, beta=0.1, covariance=True)),
        (grpo.grpo_loss, dict(logp_tok=tok, logp_old_tok=tok, mask=torch.ones_like(tok), rewards=r, clip_eps=0.2,
                              kl_coef=0.1, logp_ref_tok=tok)),
        (grpo.dr_grpo_loss, dict(logp_tok=tok, logp_old_tok=tok, mask=torch.ones_like(tok), rewards=r, max_tokens=3)),
        (qprobe.ce_loss, dict(q=f, rewards=r)),
        (qprobe.bt_loss, dict(q_chosen=f, q_rejected=r)),
        (qprobe.hinge_loss, dict(q_chosen=f, q_rejected=r, margin=1.0)),
        (metrics.bootstrap_ci, dict(x=[1.0, 2.0, 4.0], n_boot=20)),
        (metrics.paired_diff, dict(a=[1.0, 2.0, 4.0], b=[0.0, 2.5, 3.0])),
        (metrics.t_quantile, dict(level=0.9, dof=3)),
        (lm.completion_logits, dict(logits=torch.randn(2, 5, 7), prompt_width=2)),
        (lm.last_token_index, dict(prompt_width=2, completion_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))),
        (arith.prompt_text, dict(problem=("+", 47, 85, 3))),
        (arith.answer_text, dict(v=135)),
        (arith.prompt_set, dict(split="shifted", n=3)),
        (arith.WorldConfig, dict(operands=(2, 3), p_forget_long=0.9, held_out_mod=5)),
        (arith.preference_label, dict(score_a=r[0], score_b=r[1])),
        (writer.writer_law, dict(problem=("+", 47, 85), cfg=arith.WorldConfig())),
        (writer.corpus, dict(n_lines=2, seed=0)),
        # the third audit's additions (issue 28): constraints, particles, twist, the exact-world I-DLE
        (constraints.violations, dict(constraint=constraints.BadWords([[1, 2]]), prompt_ids=torch.tensor([[0, 1]]),
                                      completion_ids=torch.tensor([[2, 3]]), completion_mask=torch.tensor([[1, 1]]),
                                      vocab_size=5, prompt_mask=torch.tensor([[1, 1]]))),
        (particles.resample_index, dict(log_w=f)),
        (particles.ancestors, dict(log_w=f, scheme="multinomial")),
        (particles.resample_low_ess, dict(log_w=f.reshape(-1), B=3, k=4, ess_threshold=0.5, scheme="systematic")),
        (idle.exact_token_level, dict(logp=torch.log_softmax(torch.randn(2, 8), -1), vocab_size=2, banned_ids=[1])),
        (twist.exact_twist, dict(token_logp=-torch.rand(2, 3, 2), prompt_ids=torch.tensor([[0, 1], [1, 1]]),
                                 completion_ids=torch.tensor([[0, 0], [0, 1], [1, 1]]))),
        (klpg.kl_estimators, dict(logp=lp, logp_ref=f)),
        # the fourth audit's additions (issue 28): the KL estimators' exact world, the reward-KL frontier
        (klest.kl_penalty, dict(logp=lp, logp_ref=f, penalty="k3_corrected", logp_old=lp)),
        (klest.penalized_pg_loss, dict(logp_tok=tok, ref_tok=tok, mask=torch.ones_like(tok), rewards=r, beta=0.1,
                                       estimator="k3_loss", level="sequence", baseline="none", old_tok=tok)),
        (klest.sequence_world, dict(vocab=2, length=2, seed=0, dtype=torch.float64, device="cpu")),
        (klest.token_logp, dict(world=world, logits=world.logp_ref)),
        (klest.fixed_point, dict(world=world, beta=0.5, kind="forward")),
        (klest.expected_gradient, dict(world=world, logits=world.logp_ref, beta=0.5, estimator="k2_loss", level="token")),
        (klest.ascent, dict(world=world, beta=0.5, estimator="k2_loss", level="token", lr=0.5, steps=2, per_prefix=True)),
        (frontier.reward_kl, dict(path=[lp, lp], logp_ref=lp, reward=r)),
        (frontier.frontier, dict(logp_ref=lp, reward=r, betas=[0.1, 1.0])),
        (frontier.frontier_kl, dict(logp_ref=lp, reward=r, target=r.amax(-1).mean().item() / 2)),
        (frontier.mirror_path, dict(logp_ref=lp, reward=r, beta=0.5, step_beta=1.0, steps=2)),
        (frontier.expected_path, dict(logp_ref=lp, reward=r, beta=0.5, lr=1.0, steps=2, sampling="uniform", anchor="old",
                                      anchor_every=1)),
    ]


@pytest.mark.parametrize("fn, kwargs", _cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_malformed_arguments_give_clear_errors(fn, kwargs):
    fn(**kwargs)  # the valid call works
    for name in kwargs:
        for junk in JUNK:
            try:
                out = fn(**{**kwargs, name: junk})
            except CLEAR:
                continue
            except Exception as e:  # anything else is an unclear crash
                raise AssertionError(f"{fn.__name__}({name}={junk!r}) raised {type(e).__name__}: {e}") from e
            # Accepted: the result must be finite (a NaN or inf here would be a silent wrong answer).
            vals = out if isinstance(out, tuple) else (out,)
            for v in vals:
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    ok = ~torch.isnan(v) & ~torch.isposinf(v)
                    assert ok.all(), f"{fn.__name__}({name}={junk!r}) returned NaN/inf"


# --- regressions: each failure the review found ----------------------------------------------------

def test_grad_norm_and_config_values_are_checked():
    for bad in (-1.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match="max_grad_norm"):
            RLConfig(max_grad_norm=bad)
    RLConfig(max_grad_norm=float("inf"))  # no clipping is allowed
    with pytest.raises(ValueError, match="kl_coef"):
        grpo.grpo_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.rand(1, 2),
                       kl_coef=float("nan"))
    with pytest.raises(ValueError, match="reward"):
        tabular.train_tabular(torch.zeros(2, 3), torch.zeros(2, 4), RLConfig())  # reward wider than the support


def test_arith_reward_rejects_strings_and_wrong_target_shapes():
    from refimpl.worlds import arith

    with pytest.raises(TypeError, match="texts"):
        arith.reward("12", [1, 2])
    with pytest.raises(TypeError, match="targets"):
        arith.reward(["1", "2"], ["1", "2"])
    with pytest.raises(ValueError, match="targets"):
        arith.reward(["1", "2"], torch.tensor([[1], [2]]))
    assert arith.reward(["1", "2"], np.array([1, 2])).tolist() == [1.0, 1.0]  # NumPy ints are ints


def test_probe_pg_needs_chunks_of_two():
    with pytest.raises(ValueError, match="chunk_size"):
        qprobe.train_probe(torch.randn(2, 4, 3), torch.rand(2, 4), loss="pg", chunk_size=1)
    with pytest.raises(ValueError, match="at least 2"):
        qprobe.pg_loss(torch.randn(3, 1), torch.rand(3, 1))


def test_sequence_logprobs_input_checks(exact_world):
    model = exact_world.model
    ids, mask = exact_world.prompt_batch()
    c = exact_world.completion_ids[:16]
    cm = torch.ones_like(c)
    lm.sequence_logprobs(model, ids, mask, c, cm)
    cases = [
        (dict(prompt_mask=torch.zeros_like(mask)), "no real token"),
        (dict(completion_mask=torch.tensor([[0, 1, 1]] * 16)), "right-padded"),
        (dict(completion_mask=2 * cm), "only 0 and 1"),
        (dict(completion_ids=c[:, 0]), "dimensions"),
        (dict(completion_ids=c + 10), r"token ids in \[0, 5\)"),
        (dict(completion_ids=c - 1), r"token ids in \[0, 5\)"),
        (dict(completion_ids=c.repeat(1, 6), completion_mask=cm.repeat(1, 6)), "context"),
    ]
    for bad, match in cases:
        args = dict(prompt_ids=ids, prompt_mask=mask, completion_ids=c, completion_mask=cm) | bad
        with pytest.raises(ValueError, match=match):
            lm.sequence_logprobs(model, **args)


def test_extreme_scores_do_not_overflow():
    q = torch.tensor([[1e38, -1e38, 0.0]])
    p = resample.selection_weights(q, 0.1)
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 0.0]]))
    p16 = resample.selection_weights(torch.tensor([[10.0, 9.0]], dtype=torch.float16), 1e-4)
    assert torch.isfinite(p16).all() and p16[0, 0] == 1
    with pytest.raises(ValueError, match="scores"):
        resample.selection_weights(torch.tensor([[float("nan"), 1.0]]), 0.0)  # argmax would pick the NaN
    logp = kl.optimal_policy(torch.log_softmax(torch.zeros(3), 0), torch.tensor([1e38, 0.0, -1e38]), 0.1)
    assert torch.equal(logp.exp(), torch.tensor([1.0, 0.0, 0.0]))


def test_finetune_skips_empty_completions_and_checks_batch_size(exact_world):
    import copy

    from refimpl import rft

    model = copy.deepcopy(exact_world.model)
    s = lm.sample(model, exact_world.tokenizer, exact_world.prompts[:2], k=2, max_new_tokens=3, seed=0)
    s.completion_mask[0] = 0  # an empty completion
    curve = rft.finetune_on_successes(model, s, torch.ones(4), epochs=1)
    assert all(math.isfinite(v) for v in curve)
    with pytest.raises(ValueError, match="batch_size"):
        rft.finetune_on_successes(model, s, torch.ones(4), batch_size=0)


def test_load_model_names_the_path_and_never_runs_remote_code(tmp_path, monkeypatch):
    import refimpl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="no model folder"):
        refimpl.load_model(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="org/typo"):
        refimpl.load_model("org/typo")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text('{"model_type": "custom", "auto_map": '
                                                      '{"AutoModelForCausalLM": "modeling.Custom"}}')
    with pytest.raises(OSError, match="remote"):
        refimpl.load_model(str(tmp_path / "remote"))


def test_report_rejects_an_empty_folder_and_huge_ints(tmp_path):
    with pytest.raises(ValueError, match="out"):
        report.Report("ch", out="")
    rep = report.Report("ch", out=None)
    with pytest.raises(ValueError, match="float range"):
        rep.record(x=10**400)
    rec = report.Report("ch", out=tmp_path)
    rec.record(x=10**400)
    assert rec.values["x"] == "inf"


def test_abandoned_model_builds_are_cleaned(tmp_path, monkeypatch):
    from refimpl import models

    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    path = models.toy_model_path("refimpl/toy-exact")
    dead = path.parent / f"{path.name}.tmp-999999999-abc"
    dead.mkdir()
    models._remove_abandoned(path)
    assert not dead.exists()


def test_checks_accept_numpy_scalars():
    assert checks.integer("n", np.int64(3)) == 3 and isinstance(checks.integer("n", np.int64(3)), int)
    assert checks.real("x", np.float32(0.5)) == 0.5
    p = resample.selection_weights(torch.tensor([1.0, 2.0]), np.float64(0.5))
    assert torch.isfinite(p).all()
    with pytest.raises(TypeError, match="n"):
        checks.integer("n", True)


def test_resampling_law_with_weights_spanning_hundreds_of_nats():
    """Regression: float32 weights whose logs span > 87 nats gave NaN (0 * inf in the ratio)."""
    log_q = torch.log_softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), -1)
    log_w = torch.tensor([[0.0, -200.0, -90.0, -1.0, -300.0, 5.0, -88.0]] * 3)
    law = resample.resampling_law(log_q, log_w, ks=[1, 2, 8], n_mc=500, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(law).all()
    assert torch.allclose(law.exp().sum(-1), torch.ones(3, 3))
    assert (law[2, :, 5] > law[1, :, 5]).all()  # more candidates: more mass on the best


def test_finetune_runs_exactly_the_requested_steps(exact_world):
    """steps= fixes the optimizer-step budget whatever the data size (Adam's step counter counts them)."""
    import copy

    from refimpl import rft

    s = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:4], k=4, max_new_tokens=3, seed=0)
    for steps in (1, 5, 7):
        model = copy.deepcopy(exact_world.model)
        before = [p.detach().clone() for p in model.parameters()]
        calls = []
        from torch.optim.optimizer import register_optimizer_step_post_hook

        hook = register_optimizer_step_post_hook(lambda opt, a, k: calls.append(1))
        try:
            rft.finetune_on_successes(model, s, torch.ones(16), batch_size=3, steps=steps, epochs=1)
        finally:
            hook.remove()
        assert len(calls) == steps  # 16 rows / 3 per batch = 6 per pass: 7 needs a second pass
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="steps"):
        rft.finetune_on_successes(model, s, torch.ones(16), steps=0)


def test_finetune_callback_sees_every_checkpoint_in_eval_mode_and_changes_nothing(exact_world):
    """callback(step, model) after every optimizer step, model in eval mode; the result is the same without it."""
    import copy

    from refimpl import rft

    s = lm.sample(exact_world.model, exact_world.tokenizer, exact_world.prompts[:4], k=4, max_new_tokens=3, seed=0)
    plain, watched = copy.deepcopy(exact_world.model), copy.deepcopy(exact_world.model)
    rft.finetune_on_successes(plain, s, torch.ones(16), batch_size=3, steps=7)
    seen = []
    rft.finetune_on_successes(watched, s, torch.ones(16), batch_size=3, steps=7,
                              callback=lambda step, m: seen.append((step, m.training, m.transformer.wte.weight.sum().item())))
    assert [st for st, _, _ in seen] == list(range(1, 8)) and not any(tr for _, tr, _ in seen)
    assert len({w for _, _, w in seen}) == 7  # a different model at every step
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters()))
    with pytest.raises(TypeError, match="callback"):
        rft.finetune_on_successes(watched, s, torch.ones(16), steps=1, callback=3)
