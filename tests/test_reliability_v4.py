"""Reliability, fourth audit (issue 28): the KL estimators' exact world, the reward-KL frontier, preferences.

The same classes of case as ``test_reliability_v3.py``: empty input, batches with nothing in them,
half-precision and tiny-temperature extremes, step sizes that overflow, ``-inf`` in ``logp_ref`` (an
outcome pi_ref never produces), sizes too large to enumerate, targets no policy reaches, and public
helpers that used to take anything. "Clear error" means a ``ValueError``/``TypeError`` whose message
names the argument.
"""
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl import dpo, frontier, kl, klest, preferences

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F16 = torch.float16
INF = float("inf")


def _world(P=3, N=5, seed=0, holes=False):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(P, N, generator=g, dtype=torch.float64)
    if holes:  # outcomes pi_ref never produces
        lp[0, 1] = lp[P - 1, N - 1] = -INF
    return torch.log_softmax(lp, -1), torch.rand(P, N, generator=g, dtype=torch.float64)


# --- empty input and batches with nothing in them ----------------------------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda: klest.kl_penalty(torch.zeros(0), torch.zeros(0), "k2"), "logp"),
    (lambda: klest.penalized_pg_loss(*[torch.zeros(0, 2, 3)] * 3, torch.zeros(0, 2), 0.1, "k1_reward"), "logp_tok"),
    (lambda: klest.penalized_pg_loss(*[torch.zeros(2, 2, 0)] * 3, torch.zeros(2, 2), 0.1, "k1_reward"), "logp_tok"),
    (lambda: klest.penalized_pg_loss(*[torch.zeros(2, 2, 3)] * 3, torch.zeros(2, 2), 0.1, "k2_loss"), "mask"),
    (lambda: frontier.reward_kl([], *_world()), "path"),
    (lambda: frontier.reward_kl(torch.zeros(0, 3, 5, dtype=torch.float64), *_world()), "path"),
    (lambda: frontier.frontier_kl(*_world(), []), "target"),
    (lambda: frontier.frontier(torch.zeros(0, 4), torch.zeros(0, 4), [0.5]), "logp_ref"),
    (lambda: frontier.mirror_path(torch.zeros(0, 4), torch.zeros(0, 4), 0.5, 1.0, 2), "logp_ref"),
    (lambda: frontier.expected_path(torch.zeros(0, 4), torch.zeros(0, 4), 0.5, 1.0, 2), "logp_ref"),
])
def test_empty_input_gives_a_clear_error(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_a_batch_with_empty_completions_still_works():
    tok = torch.log_softmax(torch.randn(2, 3, 4), -1).amax(-1, keepdim=True).expand(2, 3, 4).contiguous() - 1.0
    mask = torch.ones(2, 3, 4)
    mask[0, 1] = 0  # one completion with no token: lp = 0 and K = 0, well defined
    out = klest.penalized_pg_loss(tok, tok - 0.5, mask, torch.rand(2, 3), 0.1, "k2_loss")
    assert torch.isfinite(out)


# --- half precision: computed in float32, finite and right --------------------------------------------

@SETTINGS
@given(st.floats(-600, 600), st.sampled_from(klest.PENALTIES))
def test_half_precision_kl_penalty_matches_float64(gap, penalty):
    logp = torch.tensor([0.0, -1.0, -2.5], dtype=F16)
    ref = logp.clone()
    ref[0] = gap
    out = klest.kl_penalty(logp, ref, penalty)
    exact = klest.kl_penalty(logp.double(), ref.double(), penalty)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.floats(-300, 0), st.lists(st.floats(-6e4, 6e4), min_size=2, max_size=2),
       st.sampled_from(klest.ESTIMATORS), st.sampled_from(klest.LEVELS))
def test_half_precision_penalized_pg_loss_matches_float64(ref_logp, rewards, estimator, level):
    tok = torch.full((1, 2, 3), -0.5, dtype=F16)
    ref = torch.full((1, 2, 3), ref_logp, dtype=F16)
    R = torch.tensor([rewards], dtype=F16)
    out = klest.penalized_pg_loss(tok, ref, torch.ones_like(tok), R, 0.1, estimator, level)
    exact = klest.penalized_pg_loss(tok.double(), ref.double(), torch.ones(1, 2, 3, dtype=torch.float64), R.double(),
                                    0.1, estimator, level)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-2)


def test_a_result_that_does_not_fit_its_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="penalty"):
        klest.kl_penalty(torch.tensor([0.0]), torch.tensor([-1e30]), "k2")  # ½(1e30)² overflows float32
    with pytest.raises(ValueError, match="loss"):
        tok = torch.zeros(1, 2, 3)
        klest.penalized_pg_loss(tok, tok - 1e20, torch.ones_like(tok), torch.zeros(1, 2), 0.1, "k2_loss", "sequence")


@pytest.mark.parametrize("T", [1e-3, 1e-40, 1e-300])
def test_half_precision_preferences_at_tiny_temperatures(T):
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 6, generator=g), -1).half()
    r = (torch.rand(3, 6, generator=g) * 6e4).half()
    r[0, 1] = r[0, 0]  # a tie: 0 / T must be 0, not NaN
    W = preferences.preference_table(lp, r, T)
    exact = preferences.preference_table(lp.double(), r.double(), T)
    assert W.dtype == torch.float32 and torch.isfinite(W).all()
    torch.testing.assert_close(W.double(), exact, rtol=1e-5, atol=1e-6)
    noise = preferences.label_noise(lp, r, T)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in noise)
    torch.testing.assert_close(noise.flipped.double(), preferences.label_noise(lp.double(), r.double(), T).flipped,
                               rtol=1e-5, atol=1e-6)
    pairs = preferences.preference_pairs(lp, r, 5, T, generator=torch.Generator().manual_seed(1))
    assert pairs.chosen.shape == (3, 5) and bool(((pairs.chosen >= 0) & (pairs.chosen < 6)).all())
    W32 = preferences.preference_table(lp.float(), r.float(), T)  # float32: T below its range, still finite
    assert torch.isfinite(W32).all() and torch.allclose(W32.sum((-2, -1)), torch.ones(3))


# --- the exact world of sequences: sizes, shapes, extremes ------------------------------------------

def test_sequence_world_refuses_sizes_it_cannot_enumerate():
    start = time.perf_counter()
    for kwargs in (dict(length=40), dict(vocab=1001, length=2), dict(length=10**9)):
        with pytest.raises(ValueError, match="MAX_SEQUENCES"):
            klest.sequence_world(**kwargs)
    w = klest.sequence_world()
    with pytest.raises(ValueError, match="world.vocab"):
        klest.fixed_point(w._replace(length=10**9), 0.5)
    assert time.perf_counter() - start < 5  # refused, not attempted
    for kwargs, name in ((dict(dtype=torch.int64), "dtype"), (dict(dtype="float64"), "dtype"), (dict(device=3), "device")):
        with pytest.raises(TypeError, match=name):
            klest.sequence_world(**kwargs)
    with pytest.raises(ValueError, match="device"):
        klest.sequence_world(device="nope")


def test_token_logp_checks_its_logits():
    w = klest.sequence_world()
    for logits, name in ((torch.zeros(3), "logits"), (torch.zeros(7, 3), "logits"), ([0.0], "logits"),
                         (torch.full((7, 2), float("nan")), "logits"), (torch.zeros(7, 2, dtype=torch.long), "logits")):
        with pytest.raises((ValueError, TypeError), match=name):
            klest.token_logp(w, logits)
    with pytest.raises(TypeError, match="world"):
        klest.token_logp(tuple(w), w.logp_ref)
    holes = w.logp_ref.clone()
    holes[0, 1] = -INF  # a token of probability 0 is allowed, a row of them is not
    out = klest.token_logp(w, holes)
    assert not torch.isnan(out).any() and torch.isneginf(out[:, 0]).sum() == 4
    holes[0, 0] = -INF
    with pytest.raises(ValueError, match="logits"):
        klest.token_logp(w, holes)


@pytest.mark.parametrize("beta", [1e-300, 1e-30, 1e-3])
def test_fixed_points_at_tiny_beta_are_finite_and_greedy(beta):
    w = klest.sequence_world(vocab=3, length=2, seed=1)
    lp = klest.token_logp(w, klest.fixed_point(w, beta, "optimum")).sum(-1)
    assert not torch.isnan(lp).any()
    if beta < 1e-20:  # all the mass on the best sequence
        assert lp.exp()[w.reward.argmax()] == pytest.approx(1.0)
    for kind in ("reverse", "forward"):
        out = klest.fixed_point(w, beta, kind)
        assert not torch.isnan(out).any() and not torch.isposinf(out).any()


@SETTINGS
@given(st.floats(1e-3, 1.7e308), st.sampled_from(klest.ESTIMATORS))
def test_ascent_with_any_step_size_is_finite_or_says_it_diverged(lr, estimator):
    w = klest.sequence_world()
    try:
        run = klest.ascent(w, 0.1, estimator, "token", lr=lr, steps=3)
    except ValueError as e:
        assert "diverged" in str(e) and "lr" in str(e)
        return
    assert torch.isfinite(run.logits).all() and not torch.isnan(run.history).any() and np.isfinite(run.grad_norm)


def test_ascent_reports_divergence():
    with pytest.raises(ValueError, match="diverged"):
        klest.ascent(klest.sequence_world(), 0.1, "k2_reward", "token", lr=1e307, steps=3)


# --- the frontier: targets, -inf in logp_ref, extreme steps ------------------------------------------

def test_frontier_kl_targets_follow_the_contract():
    lp, r = _world()
    base = frontier.reward_kl([lp], lp, r).reward
    top = r.amax(-1).mean()
    assert torch.equal(frontier.frontier_kl(lp, r, [-1.0, base.item() - 0.1]), torch.zeros(2, dtype=torch.float64))
    limit = -lp.gather(1, r.argmax(-1, keepdim=True)).mean()
    torch.testing.assert_close(frontier.frontier_kl(lp, r, top), limit.reshape(1))
    for bad in (1e9, top.item() + 1e-6):
        with pytest.raises(ValueError, match="target"):
            frontier.frontier_kl(lp, r, bad)
    for bad in ("0.5", None, [0.5, "x"], True):
        with pytest.raises(TypeError, match="target"):
            frontier.frontier_kl(lp, r, bad)
    for bad in (["x"], "ab", [lp, lp[:2]], 3):
        with pytest.raises((TypeError, ValueError), match="path"):
            frontier.reward_kl(bad, lp, r)
    with pytest.raises(ValueError, match="target"):
        frontier.frontier_kl(lp, r, float("nan"))
    # a path that runs to the argmax: its rewards approach the top and are all accepted
    path = frontier.mirror_path(lp, r, 0.0, 0.01, 300).logp
    pts = frontier.reward_kl(path, lp, r)
    assert (top - pts.reward[-1]).abs() < 1e-9
    out = frontier.frontier_kl(lp, r, pts.reward)
    assert torch.isfinite(out).all() and (out <= limit + 1e-9).all()


@pytest.mark.parametrize("sampling", ["policy", "uniform", "reference"])
@pytest.mark.parametrize("anchor", ["reference", "old"])
def test_expected_path_with_zero_probability_outcomes_is_the_path_on_the_support(sampling, anchor):
    lp, r = _world(holes=True)
    run = frontier.expected_path(lp, r, 0.5, 2.0, 20, sampling=sampling, anchor=anchor, anchor_every=3)
    assert torch.equal(torch.isneginf(run.logp), torch.isneginf(lp))  # pi_ref = 0 stays 0
    for p in range(lp.shape[0]):  # rows are independent: each is the same path on its support alone
        on = ~torch.isneginf(lp[p])
        alone = frontier.expected_path(torch.log_softmax(lp[p, on], -1)[None], r[p, on][None], 0.5, 2.0, 20,
                                       sampling=sampling, anchor=anchor, anchor_every=3)
        torch.testing.assert_close(run.logp[p, on], alone.logp[0], rtol=1e-12, atol=1e-12)


def test_mirror_path_at_beta_zero_with_zero_probability_outcomes():
    lp, r = _world(holes=True)
    m = frontier.mirror_path(lp, r, 0.0, 2.0, 10)
    assert not torch.isnan(m.logp).any() and torch.equal(torch.isneginf(m.logp[-1]), torch.isneginf(lp))
    star = kl.optimal_policy(lp, r, 1 / m.inverse_beta[-1].item())  # every iterate is pi*_{1/c_t}
    torch.testing.assert_close(m.logp[-1], star)


@SETTINGS
@given(st.floats(0.0, 1e300), st.floats(1e-320, 1e300), st.floats(1e-3, 1e300))
def test_extreme_steps_give_finite_paths_or_a_clear_error(beta, step_beta, lr):
    lp, r = _world(holes=True)
    try:
        m = frontier.mirror_path(lp, r, beta, step_beta, 5)
        assert not torch.isnan(m.logp).any() and not torch.isposinf(m.logp).any() and torch.isfinite(m.inverse_beta).all()
    except ValueError as e:
        assert "step_beta" in str(e)
    try:
        run = frontier.expected_path(lp, r, max(beta, 1e-3), lr, 3, sampling="uniform")
        assert not torch.isnan(run.logp).any() and not torch.isposinf(run.logp).any()
    except ValueError as e:
        assert "lr" in str(e)


# --- preferences: pairs and tables --------------------------------------------------------------------

def test_pairs_and_pair_tables_check_their_kinds():
    for args, name in ((([0], "x"), "chosen"), ((torch.zeros(1, 2, dtype=torch.long), "x"), "rejected"),
                       ((torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long)), "chosen")):
        with pytest.raises(TypeError, match=name):
            preferences.Pairs(*args)
    pairs = dpo.Pairs(torch.tensor([[0, 1, 1]]), torch.tensor([[2, 0, 0]]))
    assert isinstance(pairs, preferences.Pairs) and pairs.chosen is pairs[0] and repr(pairs).startswith("Pairs(")
    for dtype in (torch.int64, torch.bool, "float64", None):
        with pytest.raises(TypeError, match="dtype"):
            preferences.pair_table(pairs, 3, dtype=dtype)
    W = preferences.pair_table(pairs, 3, torch.float32)
    assert W.dtype == torch.float32 and W[0, 1, 0] == pytest.approx(2 / 3) and W.sum() == pytest.approx(1.0)
