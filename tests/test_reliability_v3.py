"""Reliability, third audit (issue 28): the trainers, (G)I-DLE, constraints, SMC, DPO and KL-PG.

The same classes of case as ``test_reliability_v2.py``: objects that must differ and models left in
train mode, runs that would do nothing, padding read as a prompt, empty input, half-precision and
tiny-temperature extremes, and public helpers that used to take anything. "Clear error" means a
``ValueError``/``TypeError`` whose message names the argument.
"""
import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl import constraints, dpo, idle, klpg, lm, models, particles, rl, smc, tabular, tracking, twist
from refimpl.rl import RLConfig

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F16 = torch.float16


def _reward(texts, targets):
    return torch.tensor([float(len(t) % 2) for t in texts])


# --- the LM trainer: a separate reference, in eval mode, and runs that update ------------------------

def test_rl_train_needs_a_separate_reference_in_eval_mode(exact_world):
    w, cfg = exact_world, RLConfig(k=2, prompts_per_step=2, steps=1, max_new_tokens=3, lr=1e-3)
    targets = [0] * len(w.prompts)
    policy = copy.deepcopy(w.model)
    for fn in (rl.train, rl.rollout_batch):
        with pytest.raises(ValueError, match="ref"):
            fn(policy, policy, w.tokenizer, w.prompts, targets, _reward, cfg)
    ref = copy.deepcopy(w.model).train()
    with pytest.raises(ValueError, match="ref"):  # rollout_batch trains nothing: it refuses, it does not switch
        rl.rollout_batch(policy, ref, w.tokenizer, w.prompts, targets, _reward, cfg)
    log = rl.train(policy, ref, w.tokenizer, w.prompts, targets, _reward, cfg)
    assert not ref.training and not policy.training
    assert log.kl_ref == [0.0]  # the policy is the reference at step 1: no dropout noise in the KL
    with pytest.raises(ValueError, match="staleness"):  # no update would ever happen
        rl.train(policy, ref, w.tokenizer, w.prompts, targets, _reward, RLConfig(k=2, prompts_per_step=2, steps=2,
                                                                                 staleness=2, max_new_tokens=3))
    for kwargs, name in ((dict(reward_fn=3), "reward_fn"), (dict(targets="ab"), "targets"), (dict(policy="m"), "policy"),
                         (dict(targets=[0]), "targets"), (dict(config=None), "config"), (dict(progress="yes"), "progress")):
        args = dict(policy=policy, ref=ref, tokenizer=w.tokenizer, prompts=w.prompts, targets=targets,
                    reward_fn=_reward, config=cfg) | kwargs
        with pytest.raises((ValueError, TypeError), match=name):
            rl.train(**args)


def test_group_batch_checks_its_shapes():
    t = torch.zeros(2, 3, 4)
    rl.GroupBatch(t, t, t, t, t, torch.zeros(2, 3), 4)
    for kwargs, name in ((dict(rewards=torch.zeros(3, 2)), "rewards"), (dict(mask=torch.zeros(2, 3, 5)), "mask"),
                         (dict(logp_tok=[0.0]), "logp_tok"), (dict(max_tokens=0), "max_tokens")):
        args = dict(logp_tok=t, behavior_tok=t, start_tok=t, ref_tok=t, mask=t, rewards=torch.zeros(2, 3), max_tokens=4)
        with pytest.raises((ValueError, TypeError), match=name):
            rl.GroupBatch(**(args | kwargs))


# --- tabular trainers: -inf in logp_ref, divergence, empty supports ----------------------------------

@pytest.mark.parametrize("sampling", ["policy", "uniform", "reference"])
@pytest.mark.parametrize("loss", ["gvpo", "grpo", "dr_grpo", "kl_pg"])
def test_train_tabular_with_a_zero_probability_outcome(sampling, loss):
    logp_ref = torch.log_softmax(torch.tensor([[0.0, float("-inf"), 1.0, -1.0], [0.5, 0.0, float("-inf"), 2.0]]), -1)
    reward = torch.tensor([[0.0, 5.0, 1.0, 0.5], [1.0, 0.0, 3.0, 0.2]])
    cfg = RLConfig(loss=loss, **({"beta": 0.5} if loss in ("gvpo", "kl_pg") else {}), k=4, steps=20, lr=0.5)
    run = tabular.train_tabular(logp_ref, reward, cfg, sampling=sampling)
    assert not torch.isnan(run.logp).any() and not torch.isposinf(run.logp).any()
    assert torch.equal(torch.isneginf(run.logp), torch.isneginf(logp_ref))  # pi_ref = 0 stays 0
    assert torch.allclose(run.logp.exp().sum(-1), torch.ones(2))


def test_tabular_trainers_refuse_empty_supports_and_report_divergence():
    cfg = RLConfig(k=2, steps=2)
    for lp in (torch.zeros(3, 0), torch.zeros(0, 4), torch.full((1, 3), float("-inf"))):
        with pytest.raises(ValueError, match="logp_ref"):
            tabular.train_tabular(lp, torch.zeros_like(lp).nan_to_num(neginf=0.0), cfg)
    lp = torch.log_softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match="diverged"):
        tabular.train_tabular(lp, torch.rand(3, 4) * 3e38, RLConfig(beta=0.5, k=2, steps=3, lr=0.5))
    W = dpo.preference_table(lp, torch.rand(3, 4))
    for lr in (1.01, 1.5):  # above lr = 1 the Jacobi step diverges
        with pytest.raises(ValueError, match="lr"):
            dpo.train_dpo_tabular(lp, W, 0.5, 3, lr, precondition=True)
    dpo.train_dpo_tabular(lp, W, 0.5, 3, 1.5)  # plain steps have no such bound
    assert torch.isfinite(dpo.train_dpo_tabular(lp, W, 0.5, 3, 0.5, precondition=np.bool_(True)).logp).all()
    with pytest.raises(ValueError, match="logp_ref"):
        dpo.train_dpo_tabular(torch.zeros(0, 4), torch.zeros(0, 4, 4), 0.5, 3, 0.5)


# --- half precision and tiny temperatures: float32 inside, finite and right --------------------------

@SETTINGS
@given(st.floats(-6e4, 6e4), st.floats(-6e4, 6e4), st.sampled_from([1e-3, 0.1, 1.0]))
def test_half_precision_dpo_loss_matches_float64(a, b, beta):
    x = torch.tensor([a, b, -a, -b], dtype=F16)
    out = dpo.dpo_loss(x[0:1], x[1:2], x[2:3], x[3:4], beta)
    ref = dpo.dpo_loss(*(x[i:i + 1].double() for i in range(4)), beta)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(st.floats(-300, 300), st.lists(st.floats(-6e4, 6e4), min_size=3, max_size=3),
       st.sampled_from(klpg.ESTIMATORS), st.sampled_from(klpg.BASELINES))
def test_half_precision_kl_pg_loss_matches_float64(gap, rewards, estimator, baseline):
    logp = torch.tensor([[0.0, -1.0, -2.0]], dtype=F16)
    ref = logp.clone()
    ref[0, 0] = gap
    R = torch.tensor([rewards], dtype=F16)
    out = klpg.kl_pg_loss(logp, ref, R, 0.1, estimator, baseline)
    exact = klpg.kl_pg_loss(logp.double(), ref.double(), R.double(), 0.1, estimator, baseline)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-2)
    adv = klpg.rloo_advantages(R)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()


def test_soft_values_compute_reward_over_beta_in_float32():
    logp = torch.log_softmax(torch.randn(2, 8), -1)
    big = torch.full((2, 8), 6e4)
    out = smc.soft_values(logp.half(), big.half(), 1e-3, 2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out)
    torch.testing.assert_close(out[0], smc.soft_values(logp.half().double(), big.double(), 1e-3, 2)[0].float())
    with pytest.raises(ValueError, match="overflows"):
        smc.soft_values(logp, torch.full((2, 8), 1e38), 1e-3, 2)
    for lp, r, name in ((torch.zeros(0, 8), torch.zeros(0, 8), "logp"), (torch.zeros(2, 0), torch.zeros(2, 0), "logp"),
                        (torch.full((1, 8), float("-inf")), torch.zeros(1, 8), "logp"),
                        (logp, torch.full((2, 8), float("-inf")), "reward")):
        with pytest.raises(ValueError, match=name):
            smc.soft_values(lp, r, 0.5, 2)
    for psi, name in (([torch.full((2, 2**t), float("nan")) for t in range(4)], "log_psi"),
                      ([torch.full((2, 2**t), float("-inf")) for t in range(4)], "log_psi")):
        with pytest.raises(ValueError, match=name):
            smc.guided_law(logp, psi, 2)


def test_tiny_temperatures_do_not_overflow(exact_world):
    ids, mask = exact_world.prompt_batch()
    c = exact_world.completion_ids[:ids.shape[0]]
    cm = torch.ones_like(c)
    lw = idle.log_allowed_mass(exact_world.model, ids, mask, c, cm, [1], temperature=1e-40)
    assert not torch.isnan(lw).any() and (lw <= 0).all()
    logits = lm.forward(exact_world.model, ids, mask, c, cm).logits[:, ids.shape[1] - 1:-1]  # [B, T, V]
    greedy_ok = (logits.argmax(-1) != 1).all(-1)  # at T -> 0 all mass is on the argmax: allowed unless it is 1
    assert torch.equal(lw == 0, greedy_ok)
    out = smc.ConstrainedStep([1], 1e-40)(torch.zeros(2, 0), torch.tensor([[3.0, 1.0, 2.0], [0.0, 4.0, 5.0]]))
    assert not torch.isnan(out.log_q).any() and out.log_q.exp().sum(-1).allclose(torch.ones(2))
    assert out.log_q[0, 0] == 0 and out.log_q[1, 2] == 0  # the best allowed token


# --- padding: a prefix-dependent ban reads the prompt as generate sees it ----------------------------

def test_right_padded_prompts_give_the_same_bans(exact_world):
    ids, mask = exact_world.prompt_batch()  # [16, 2], no padding
    B = ids.shape[0]
    c = exact_world.completion_ids[:B]
    cm = torch.ones_like(c)
    pad = exact_world.tokenizer.pad_token_id
    rule = constraints.BadWords([[int(t), int(c[i, 0])] for i, t in enumerate(ids[:, -1])])  # bans each row's own first token
    right = torch.cat([ids, torch.full((B, 1), pad)], 1), torch.cat([mask, torch.zeros(B, 1, dtype=mask.dtype)], 1)
    left = torch.cat([torch.full((B, 1), pad), ids], 1), torch.cat([torch.zeros(B, 1, dtype=mask.dtype), mask], 1)
    base = idle.log_allowed_mass(exact_world.model, ids, mask, c, cm, rule)
    for p_ids, p_mask in (right, left):
        torch.testing.assert_close(idle.log_allowed_mass(exact_world.model, p_ids, p_mask, c, cm, rule), base)
    hit = constraints.violations(rule, ids, c, cm, 5)
    assert hit.all()
    assert torch.equal(constraints.violations(rule, *right[:1], c, cm, 5, prompt_mask=right[1]), hit)
    assert torch.equal(constraints.violations(rule, left[0], c, cm, 5), hit)


def test_violations_check_ids_masks_and_rows():
    rule = constraints.BannedTokens([4])
    p, c, m = torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    for kwargs, name in ((dict(completion_ids=torch.tensor([[7, 0]])), "completion_ids"),
                         (dict(completion_ids=torch.tensor([[-1, 0]])), "completion_ids"),
                         (dict(completion_mask=torch.ones(1, 3)), "completion_mask"), (dict(completion_mask=2 * m), "completion_mask"),
                         (dict(prompt_ids=torch.zeros(2, 2, dtype=torch.long)), "prompt_ids"),
                         (dict(prompt_ids=p.float()), "prompt_ids"), (dict(vocab_size=0), "vocab_size"),
                         (dict(vocab_size=True), "vocab_size"), (dict(constraint="ab"), "constraint")):
        args = dict(constraint=rule, prompt_ids=p, completion_ids=c, completion_mask=m, vocab_size=5) | kwargs
        with pytest.raises((ValueError, TypeError), match=name):
            constraints.violations(**args)


# --- empty input and messages that say what to do ----------------------------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda: klpg.kl_estimators(torch.zeros(0), torch.zeros(0)), "logp"),
    (lambda: klpg.kl_estimators(torch.zeros(3, 0), torch.zeros(3, 0)), "logp"),
    (lambda: klpg.rloo_advantages(torch.zeros(0, 3)), "rewards"),
    (lambda: klpg.expected_gradient(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), 0.1, "k1_reward"), "logits"),
    (lambda: idle.exact_token_level(torch.zeros(2, 0), 2, [1]), "logp"),
    (lambda: twist.exact_twist(torch.zeros(1, 0, 2), torch.zeros(1, 2, dtype=torch.long),
                               torch.zeros(0, 2, dtype=torch.long)), "token_logp"),
    (lambda: idle.exclude_and_renormalize(torch.zeros(2, 0), []), "empty vocabulary"),
])
def test_empty_input_gives_a_clear_error(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_a_reused_tracking_processor_says_to_reset(exact_world):
    w = exact_world
    rule = constraints.BadWords([[1, 2]])
    proc = idle.IDLELogitsProcessor(rule, track_temperature=1.0)
    first = lm.sample(w.model, w.tokenizer, w.prompts[:1], k=2, max_new_tokens=2, logits_processor=[proc], seed=0)
    longer = [w.prompts[0] + " " + first.texts[0]]
    with pytest.raises(ValueError, match="reset"):
        lm.sample(w.model, w.tokenizer, longer, k=2, max_new_tokens=2, logits_processor=[proc], seed=0)
    proc.reset()
    s = lm.sample(w.model, w.tokenizer, longer, k=2, max_new_tokens=2, logits_processor=[proc], seed=0)
    assert proc.log_allowed_mass(s.completion_mask).shape == (2,)
    with pytest.raises(ValueError, match="completion_mask"):
        idle.IDLELogitsProcessor(rule, track_temperature=1.0).log_allowed_mass(torch.ones(2, 3))


def test_helpers_check_their_arguments():
    for call, name in (
            (lambda: models.toy_model_path("nope"), "name"), (lambda: models.toy_model_path(3), "name"),
            (lambda: models.toy_model_path("refimpl/toy-exact", shipped="yes"), "shipped"),
            (lambda: models.load_model("refimpl/toy-exact", device=3.5), "device"),
            (lambda: idle.IDLELogitsProcessor([1], check="no"), "check"),
            (lambda: tracking.Tracker("x"), "constraint"),
            (lambda: tracking.Tracker(constraints.BadWords([[1, 2]])).update(torch.zeros(2, 3)), "input_ids"),
            (lambda: tracking.Tracker(constraints.BadWords([[1, 2]])).update(torch.zeros(3, dtype=torch.long)), "input_ids"),
            (lambda: constraints.Utf8Ban("ab"), "ranges"), (lambda: constraints.Utf8Ban([(1, 2, 3)]), "ranges"),
            (lambda: constraints.Automaton(lambda s, b: s, 0, 3), "token_bytes"),
            (lambda: list(constraints.iter_banned(constraints.BadWords([[1, 2]]), torch.zeros(1, 2, dtype=torch.long),
                                                  torch.zeros(1, 2), 5)), "completion_ids"),
            (lambda: smc.TwistedStep("x", torch.zeros(1, 2, dtype=torch.long)), "log_psi"),
            (lambda: smc.smc("x", None, ["a"], smc.ConstrainedStep([1])), "model"),
            (lambda: particles.resample_low_ess(torch.zeros(6), 4, 2, 0.5, "systematic"), "log_w"),
            (lambda: particles.resample_low_ess(torch.zeros(6), 3, 2, 2.0, "systematic"), "ess_threshold"),
            (lambda: particles.resample_low_ess(torch.full((6,), float("-inf")), 3, 2, 0.5, "systematic"), "log_w"),
            (lambda: twist.exact_twist(torch.zeros(1, 1, 2), torch.zeros(1, 2, dtype=torch.long),
                                       torch.zeros(1, 2, dtype=torch.long, device="meta")), "completion_ids|prompt_ids"),
    ):
        with pytest.raises((ValueError, TypeError), match=name):
            call()
    ess, need, lw, index = particles.resample_low_ess(torch.zeros(6), 3, 2, 0.5, "systematic")
    assert torch.equal(ess, torch.full((3,), 2.0)) and not need.any() and index is None
