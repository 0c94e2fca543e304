"""refimpl.twist: the exact twist against the dense soft values and by enumeration (the sampler's law
is the target's, every weight 1), the ASAp estimate (an upper bound, exact once every allowed
prefix is visited), and bad input."""
import itertools
import math

import pytest
import torch

from refimpl import kl, lm, smc, twist
from refimpl.sampling import Samples

BAN = [4]  # 'd'


@pytest.fixture(scope="module")
def setup(exact_world):
    w = exact_world
    ids, mask = w.prompt_batch()
    logp = w.logp().detach().double()  # [16, 125]
    allowed = ~torch.isin(w.completion_ids, torch.tensor(BAN)).any(-1)  # [125]
    A = w.completion_ids[allowed]  # [64, 3] every allowed completion
    P, N = ids.shape[0], len(A)
    _, tok = lm.sequence_logprobs(w.model, ids.repeat_interleave(N, 0), mask.repeat_interleave(N, 0), A.repeat(P, 1),
                                  torch.ones_like(A).repeat(P, 1))
    log_pi = (logp - torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), -1, keepdim=True)).masked_fill(
        ~allowed, float("-inf"))  # [16, 125] log P(y | allowed)
    return w, ids, logp, allowed, A, tok.view(P, N, 3), log_pi


def _step_law(w, ids, step, rows, comp):
    """[len(rows), N] log q(y) and the summed log weights Σ_t (log γ_t - log q_t) of the completions
    comp [N, 3], by enumeration: the step run along each completion, one position at a time."""
    N = len(comp)
    log_q = torch.zeros(len(rows), N, dtype=torch.float64)
    log_inc = torch.zeros(len(rows), N, dtype=torch.float64)
    for j, p in enumerate(rows):
        prompt = ids[p:p + 1].expand(N, -1)
        state = step.start(prompt)
        for t in range(3):
            with torch.no_grad():
                logits = w.model(input_ids=torch.cat([prompt, comp[:, :t]], 1)).logits[:, -1]
            lq, lg = step(state, logits)
            y = comp[:, t:t + 1]
            log_q[j] += lq.double().gather(1, y).squeeze(1)
            log_inc[j] += (lg - lq).double().gather(1, y).squeeze(1)
            state = step.advance(state, comp[:, t])
    return log_q, log_inc


def test_exact_twist_is_the_soft_value_and_samples_the_target_exactly(setup, exact_world):
    w, ids, logp, allowed, A, tok, log_pi = setup
    tw = twist.exact_twist(tok, ids, A, pad_token_id=0)
    r = torch.zeros(125, dtype=torch.double).masked_fill(~allowed, float("-inf")).expand(16, 125)
    dense = smc.soft_values(logp, r, 1.0, 5)  # log P(allowed | y_<=t), [16, 5^t]
    for p, t in itertools.product(range(16), range(3)):
        for code, pref in enumerate(itertools.product(range(5), repeat=t)):
            a, b = tw.values.get(tw.key(ids[p].tolist(), pref), float("-inf")), dense[t][p, code].item()
            assert (math.isinf(a) and math.isinf(b)) or abs(a - b) < 1e-5, (p, pref, a, b)
    step = twist.TwistedBanStep(BAN, tw)
    log_q, log_inc = _step_law(w, ids, step, [0, 5, 11], A)  # over the allowed completions
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(3, dtype=torch.double), atol=1e-6)  # none banned
    assert (log_q - log_pi[[0, 5, 11]][:, allowed]).abs().max() < 1e-5  # the proposal is the target
    assert log_inc.abs().max() < 1e-5  # and every weight is 1
    res = smc.smc(w.model, w.tokenizer, w.prompts[:2], step, k=500, max_new_tokens=3, adapted=True, seed=0)
    assert (res.log_w.max(-1).values - res.log_w.min(-1).values).max() < 1e-4 and (res.n_resamples == 0).all()
    assert not res.samples.contains(BAN).any()


def test_twisted_step_with_a_flat_twist_is_idle_and_keeps_the_target(setup, exact_world):
    """ψ = 1 everywhere: q is (G)I-DLE's token-level law, and log q + log w = log P(y) (the target's)."""
    from refimpl import idle

    w, ids, logp, allowed, A, tok, log_pi = setup
    step = twist.TwistedBanStep(BAN, twist.PrefixTwist({}, horizon=3))
    log_q, log_inc = _step_law(w, ids, step, [3], A)
    lq_idle, _ = idle.exact_token_level(logp[3:4], 5, BAN)
    assert torch.allclose(log_q, lq_idle[:, allowed], atol=1e-5)
    assert torch.allclose(log_q + log_inc, logp[3:4, allowed], atol=1e-5)
    assert 0.5 * (log_q.exp() - log_pi[3:4, allowed].exp()).abs().sum() > 0.02  # q is not the target


def test_asap_twist_bounds_the_exact_one_and_meets_it_on_full_coverage(setup, exact_world):
    w, ids, logp, allowed, A, tok, log_pi = setup
    exact = twist.exact_twist(tok, ids, A, pad_token_id=0)
    p = 7
    every = Samples(ids[p:p + 1].expand(64, -1), torch.ones(64, 2, dtype=torch.long), A, torch.ones_like(A),
                    [""] * 64, torch.zeros(64, dtype=torch.long), 64)
    full = twist.asap_twist(w.model, every, BAN, horizon=3, pad_token_id=0)
    for key, v in full.values.items():
        assert abs(v - exact.values[key]) < 1e-5  # every allowed continuation visited: exact
    few = lm.sample(w.model, w.tokenizer, [w.prompts[p]], k=6, max_new_tokens=3, seed=0)
    est = twist.asap_twist(w.model, few, BAN, horizon=3, pad_token_id=0)
    assert len(est.values) < len(full.values)
    assert all(v >= exact.values.get(key, float("-inf")) - 1e-6 for key, v in est.values.items())  # an upper bound
    tv = [0.5 * (_step_law(w, ids, twist.TwistedBanStep(BAN, t), [p], A)[0].exp() - log_pi[p, allowed].exp()).abs().sum()
          for t in (twist.PrefixTwist({}, 3), est, full)]
    assert tv[0] > tv[1] > tv[2] and tv[2] < 1e-5  # flat (I-DLE) > estimated > exact


def test_bad_input(setup, exact_world):
    w, ids, logp, allowed, A, tok, log_pi = setup
    with pytest.raises(TypeError, match="values"):
        twist.PrefixTwist([], 3)
    with pytest.raises(ValueError, match="horizon"):
        twist.PrefixTwist({}, 0)
    with pytest.raises(ValueError, match="default"):
        twist.PrefixTwist({}, 3, default=0.5)
    with pytest.raises(TypeError, match="twist"):
        twist.TwistedBanStep(BAN, {})
    with pytest.raises(ValueError, match="completion_ids"):
        twist.exact_twist(tok, ids, A[:10])
    with pytest.raises(TypeError, match="samples"):
        twist.asap_twist(w.model, A, BAN, 3)
    s = lm.sample(w.model, w.tokenizer, ["ab"], k=2, max_new_tokens=2, seed=0)
    with pytest.raises(ValueError, match="horizon"):
        twist.asap_twist(w.model, s, BAN, 3)
