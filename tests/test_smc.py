"""refimpl.smc: the law of the output against the exact answer, plain sampling as the unweighted case,
the KV cache under resampling, resampling schemes, resampling before the draw, distinct particles,
a twisted SMC with the exact twist, and long completions against the enumerated answer."""
import pytest
import torch

from refimpl import idle, kl, lm, smc
from refimpl import constraints as C

torch.set_num_threads(1)


def _law(world, r: smc.SMCResult) -> torch.Tensor:
    """[B, 125] the weighted empirical law of the particles of each prompt."""
    B, k = r.log_w.shape
    idx = world.completion_index(r.samples.completion_ids).view(B, k)
    return torch.zeros(B, len(world.completions)).scatter_add_(1, idx, torch.softmax(r.log_w, -1))


def test_law_matches_constrained_target_and_rejection(exact_world):
    """Banning 'd': the weighted particles approach P(y | allowed) and log Ẑ approaches log P(allowed)."""
    w, ban, k = exact_world, [4], 3000
    logp = w.logp().detach()[:3]
    allowed = ~torch.isin(w.completion_ids, torch.tensor(ban)).any(-1)
    log_pa = torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), -1)  # [3]
    pstar = (logp - log_pa[:, None]).exp() * allowed  # P(y | allowed)
    r = smc.smc(w.model, w.tokenizer, w.prompts[:3], smc.ConstrainedStep(ban), k=k, max_new_tokens=3,
                ess_threshold=1.0, resampling="systematic", seed=0)  # resample at every step
    assert (r.n_resamples == 3).all() and not r.samples.contains(ban).any()
    tv_smc = 0.5 * (_law(w, r) - pstar).abs().sum(-1)
    rej = idle.rejection_sample(w.model, w.tokenizer, w.prompts[:3], ban, k=k, max_new_tokens=3, seed=0)
    idx = w.completion_index(rej.samples.completion_ids).view(3, k)
    acc = rej.accepted.view(3, k).float()
    emp = torch.zeros(3, 125).scatter_add_(1, idx, acc) / acc.sum(-1, keepdim=True)
    tv_rej = 0.5 * (emp - pstar).abs().sum(-1)
    assert (tv_smc < 0.05).all() and (tv_rej < 0.15).all()  # rejection keeps only ~30% of its draws
    assert torch.allclose(r.log_z, log_pa, atol=0.05)
    # the final resampling draws from the weighted particles
    d = r.draw(n=2000, seed=1)
    freq = torch.zeros(3, 125).scatter_add_(1, w.completion_index(d.completion_ids).view(3, 2000), torch.ones(3, 2000))
    assert (0.5 * (freq / 2000 - pstar).abs().sum(-1) < 0.08).all()


def test_nothing_banned_is_plain_sampling(exact_world):
    w, k = exact_world, 500
    r = smc.smc(w.model, w.tokenizer, w.prompts[:4], smc.ConstrainedStep([]), k=k, max_new_tokens=3, seed=0)
    s = lm.sample(w.model, w.tokenizer, w.prompts[:4], k=k, max_new_tokens=3, seed=0, batch_size=4 * k)
    assert torch.equal(r.samples.completion_ids, s.completion_ids)  # the same draws, seed for seed
    assert r.log_w.abs().max() < 1e-5 and r.log_z.abs().max() < 1e-5
    assert (r.n_resamples == 0).all() and torch.allclose(r.ess, torch.full_like(r.ess, k))
    assert torch.allclose(r.logq, r.logp, atol=1e-5)


def test_cache_reordered_on_resampling(arith_model):
    """Multinomial resampling at every step shuffles the particles; the log-probs accumulated with
    the KV cache equal those recomputed from scratch, and log q = log P - log w."""
    model, tok = arith_model
    ban = [tok.convert_tokens_to_ids("0")]
    r = smc.smc(model, tok, ["4 7 + 8 5 =", "0 9 + 3 3 =", "5 5 + 6 6 + 7 7 ="], smc.ConstrainedStep(ban), k=16, max_new_tokens=6,
                ess_threshold=1.0, resampling="multinomial", seed=0)
    s = r.samples
    assert (r.n_resamples == r.ess.shape[1]).all() and r.ess.shape[1] >= 3
    assert (s.completion_mask.sum(1) < 6).any()  # some particles stopped (';') and were padded
    logp, _ = lm.sequence_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    torch.testing.assert_close(r.logp, logp.detach(), atol=1e-4, rtol=0)
    log_w = idle.log_allowed_mass(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, ban)
    torch.testing.assert_close(r.logq, logp.detach() - log_w, atol=1e-4, rtol=0)
    assert not s.contains(ban).any()
    # the last resampling reset every weight to the group's mean: log Ẑ = that mean
    torch.testing.assert_close(r.log_w, r.log_z[:, None].expand_as(r.log_w))


def test_resampling_schemes_unbiased():
    log_w = torch.log(torch.tensor([[0.0, 0.1, 0.2, 0.7], [0.25, 0.25, 0.25, 0.25]]))
    torch.manual_seed(0)
    for scheme in ("multinomial", "systematic"):
        counts = torch.zeros(2, 4)
        for _ in range(2000):
            a = smc.ancestors(log_w, scheme)
            counts += torch.nn.functional.one_hot(a, 4).sum(1)
        assert counts[0, 0] == 0  # a weight of zero is never copied
        assert torch.allclose(counts / 2000, 4 * log_w.exp(), atol=0.06)  # E[copies of i] = k W_i
    a = smc.ancestors(log_w, "systematic")  # systematic: copies within 1 of k W_i
    copies = torch.nn.functional.one_hot(a, 4).sum(1)
    assert ((copies - 4 * log_w.exp()).abs() < 1).all()
    assert smc.resample_index(torch.tensor([[0.0, float("-inf")]] * 50)).eq(0).all()


def _exact_twist(world, reward, beta):
    """log psi_t(y_<=t) = log E_P[exp(r / beta) | y_<=t] for t = 0..3, by enumeration: [16, 5^t] each."""
    logp = world.logp().detach().view(16, 5, 5, 5)
    a = logp + (reward / beta).view(16, 5, 5, 5)
    out = [torch.logsumexp(a, (1, 2, 3)).view(16, 1)]
    for t, dims in ((1, (2, 3)), (2, (3,))):
        out.append((torch.logsumexp(a, dims) - torch.logsumexp(logp, dims)).reshape(16, 5 ** t))
    return out + [(reward / beta).view(16, 125)]


def test_soft_values_and_guided_law(exact_world):
    """The exact twist against enumeration; guidance with it is pi*; the empirical law's values are
    the Monte Carlo averages of exp(r / beta) (with back-off), and guidance with them is not pi*."""
    w, beta = exact_world, 0.25
    logp = w.logp().detach().double()
    r = w.reward.double()
    log_psi = smc.soft_values(logp, r, beta, 5)
    for a, b in zip(log_psi, _exact_twist(w, w.reward, beta)):
        torch.testing.assert_close(a, b.double(), atol=1e-4, rtol=0)
    star = kl.optimal_policy(logp, r, beta)
    torch.testing.assert_close(smc.guided_law(logp, log_psi, 5), star, atol=1e-10, rtol=0)
    flat = [torch.zeros_like(p) for p in log_psi[:-1]] + [log_psi[-1]]  # a value that ignores the future
    myopic = smc.guided_law(logp, flat, 5)
    assert (kl.total_variation(myopic, star) > 0.01).all()
    # the law of the myopic guidance: P(y_1) P(y_2 | y_1) q_3(y_3 | y_<3) with q_3 ∝ P exp(r / beta)
    lp = logp.view(16, 25, 5)
    q3 = torch.log_softmax(lp + (r / beta).view(16, 25, 5), -1)
    torch.testing.assert_close(myopic, (torch.logsumexp(lp, -1, keepdim=True) + q3).view(16, 125))
    # estimated from M samples: an MC average of exp(r / beta) over the samples sharing the prefix
    idx = torch.multinomial(logp.exp(), 40, replacement=True, generator=torch.Generator().manual_seed(0))  # [16, 40]
    counts = torch.zeros(16, 125, dtype=torch.float64).scatter_add_(1, idx, torch.ones(16, 40, dtype=torch.float64))
    est = smc.soft_values((counts / 40).log(), r, beta, 5)
    first = idx // 25  # first token of each sample
    for p in range(3):
        for v in range(5):
            hit = first[p] == v
            want = torch.log((r[p, idx[p, hit]] / beta).exp().mean()) if hit.any() else est[0][p, 0]
            torch.testing.assert_close(est[1][p, v], want)
    torch.testing.assert_close(est[0][:, 0], torch.log((r.gather(1, idx) / beta).exp().mean(1)))
    assert kl.total_variation(smc.guided_law(logp, est, 5), star).mean() > 1e-3


def test_twisted_smc_with_exact_twist_samples_the_optimum(exact_world):
    w, beta, k = exact_world, 0.25, 2000
    logp = w.logp().detach()
    log_psi = smc.soft_values(logp, w.reward, beta, 5)
    log_pi = kl.optimal_policy(logp, w.reward, beta)  # [16, 125]
    step = smc.TwistedStep(log_psi, w.prompt_batch()[0])
    r = smc.smc(w.model, w.tokenizer, w.prompts[:2], step, k=k, max_new_tokens=3, seed=0)
    assert r.log_w.abs().max() < 1e-4 and (r.n_resamples == 0).all()  # constant weights: ESS = k
    assert torch.allclose(r.ess, torch.full_like(r.ess, k))
    # gamma_1 divides by psi_0 = E_P[exp(r / beta)], so Ẑ estimates Z / psi_0 = 1, here exactly
    assert r.log_z.abs().max() < 1e-4
    idx = w.completion_index(r.samples.completion_ids).view(2, k)
    torch.testing.assert_close(r.logq.view(2, k), log_pi[:2].gather(1, idx), atol=1e-4, rtol=0)  # q = pi*
    freq = torch.zeros(2, 125).scatter_add_(1, idx, torch.ones(2, k)) / k
    assert (kl.total_variation(freq, log_pi[:2].exp()) < 0.08).all()
    # a poorer twist (the value of a flat reward): the proposal is the guided law, the weights correct it
    flat = smc.soft_values(logp, torch.zeros_like(w.reward), beta, 5)[:-1] + [log_psi[-1]]
    r = smc.smc(w.model, w.tokenizer, w.prompts[5:7], smc.TwistedStep(flat, w.prompt_batch()[0]), k=k,
                max_new_tokens=3, seed=0)
    idx = w.completion_index(r.samples.completion_ids).view(2, k)
    torch.testing.assert_close(r.logq.view(2, k), smc.guided_law(logp, flat, 5)[5:7].gather(1, idx), atol=1e-4, rtol=0)
    assert r.log_w.std() > 0.1 and (_law(w, r) - log_pi[5:7].exp()).abs().sum(-1).max() < 0.2
    with pytest.raises(ValueError, match="prompt_ids"):
        smc.smc(w.model, w.tokenizer, ["ab"], smc.TwistedStep(log_psi, w.prompt_batch()[0][:1]), k=2, max_new_tokens=3)


def test_adapted_resampling_before_the_draw(exact_world):
    """adapted=True weights by Z_t before the draw: with (G)I-DLE's step (q ∝ γ) the draw adds
    nothing, so after a resampling every weight is equal; the law and log Ẑ still converge."""
    w, ban, k = exact_world, [4], 3000
    logp = w.logp().detach()[:3]
    allowed = ~torch.isin(w.completion_ids, torch.tensor(ban)).any(-1)
    log_pa = torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), -1)  # [3]
    pstar = (logp - log_pa[:, None]).exp() * allowed
    r = smc.smc(w.model, w.tokenizer, w.prompts[:3], smc.ConstrainedStep(ban), k=k, max_new_tokens=3,
                ess_threshold=1.0, adapted=True, seed=0)  # resample at every step, before the draw
    assert (r.n_resamples == 3).all() and not r.samples.contains(ban).any()
    assert (r.log_w.max(-1).values - r.log_w.min(-1).values).max() < 1e-4  # the draw moved no weight
    assert (0.5 * (_law(w, r) - pstar).abs().sum(-1) < 0.05).all() and torch.allclose(r.log_z, log_pa, atol=0.05)
    never = smc.smc(w.model, w.tokenizer, w.prompts[:3], smc.ConstrainedStep(ban), k=64, max_new_tokens=3,
                    ess_threshold=0.0, adapted=True, seed=0)  # no resampling: one-shot importance weights
    plain = smc.smc(w.model, w.tokenizer, w.prompts[:3], smc.ConstrainedStep(ban), k=64, max_new_tokens=3,
                    ess_threshold=0.0, seed=0)
    assert torch.equal(never.samples.completion_ids, plain.samples.completion_ids)
    assert torch.allclose(never.log_w, plain.log_w, atol=1e-5)


def test_distinct_particles_counted_per_step(exact_world):
    """distinct[:, t] = the number of different prefixes y_<=t among a prompt's particles after
    step t's resampling: without resampling, read off the final particles; at the end, always."""
    w = exact_world
    for thr in (0.0, 1.0):
        r = smc.smc(w.model, w.tokenizer, w.prompts[:4], smc.ConstrainedStep([4]), k=40, max_new_tokens=3,
                    ess_threshold=thr, resampling="multinomial", seed=1)
        comp = r.samples.completion_ids.view(4, 40, 3)
        for t in range(3) if thr == 0 else [2]:
            assert r.distinct[:, t].tolist() == [len(torch.unique(c[:, :t + 1], dim=0)) for c in comp]
        assert (r.distinct[:, 1:] >= r.distinct[:, :-1]).all() or thr > 0


def test_long_completions_against_the_exact_answer(exact_world):
    """10 tokens with <pad>, 'a' and 'd' banned: the allowed completions ({b, c}^10) are enumerated, so
    E[#b / 10 | allowed] is known exactly. Self-normalized estimators are biased at k = 32: one-shot
    importance resampling most, SMC less, resampling before the draw least; the twisted SMC with
    the exact twist has every weight equal, and its estimates are unbiased."""
    import itertools

    from refimpl import twist

    w, ban, L, x, R = exact_world, [0, 1, 4], 10, "bc", 24
    A = torch.tensor(list(itertools.product([2, 3], repeat=L)))  # [1024, 10] every allowed completion
    ids = w.tokenizer([x], return_tensors="pt")["input_ids"]
    _, tok = lm.sequence_logprobs(w.model, ids.expand(len(A), -1), torch.ones(len(A), 2, dtype=torch.long), A,
                                  torch.ones_like(A))
    pi = torch.softmax(tok.double().sum(-1), -1)
    truth = (pi * (A == 2).double().mean(1)).sum()
    assert 0.1 < truth < 0.9 and pi.max() < 0.5  # not a point mass

    def estimates(step, **kw):
        r = smc.smc(w.model, w.tokenizer, [x] * R, step, k=32, max_new_tokens=L, seed=0, **kw)
        f = (r.samples.completion_ids == 2).double().mean(1).view(R, 32)
        return (torch.softmax(r.log_w.double(), -1) * f).sum(-1) - truth, r  # [R] errors

    bias = {name: estimates(smc.ConstrainedStep(ban), **kw)[0].mean() for name, kw in
            [("one-shot", dict(ess_threshold=0.0)), ("smc", {}), ("adapted", dict(adapted=True))]}
    assert bias["one-shot"] > bias["smc"] > bias["adapted"] > 0 and bias["one-shot"] > 0.05
    tw = twist.exact_twist(tok.view(1, len(A), L), ids, A)
    err, r = estimates(twist.TwistedBanStep(ban, tw), adapted=True)
    assert (r.log_w.max(-1).values - r.log_w.min(-1).values).max() < 1e-4 and (r.n_resamples == 0).all()
    assert err.mean().abs() < 3 * err.std() / R ** 0.5 + 1e-3


def test_bad_input(exact_world):
    w = exact_world
    step = smc.ConstrainedStep([4])
    with pytest.raises(TypeError, match="prompts"):
        smc.smc(w.model, w.tokenizer, "ab", step)
    with pytest.raises(ValueError, match="k"):
        smc.smc(w.model, w.tokenizer, ["ab"], step, k=0)
    with pytest.raises(ValueError, match="ess_threshold"):
        smc.smc(w.model, w.tokenizer, ["ab"], step, ess_threshold=1.5)
    with pytest.raises(ValueError, match="resampling"):
        smc.smc(w.model, w.tokenizer, ["ab"], step, resampling="stratified")
    with pytest.raises(TypeError, match="step"):
        smc.smc(w.model, w.tokenizer, ["ab"], object())
    with pytest.raises(TypeError, match="adapted"):
        smc.smc(w.model, w.tokenizer, ["ab"], step, adapted="yes")
    with pytest.raises(ValueError, match="context"):
        smc.smc(w.model, w.tokenizer, ["ab"], step, max_new_tokens=20)
    with pytest.raises(ValueError, match="temperature"):
        smc.ConstrainedStep([4], temperature=0.0)
    with pytest.raises(ValueError, match="everything is banned"):
        smc.smc(w.model, w.tokenizer, ["ab"], smc.ConstrainedStep([0, 1, 2, 3, 4]), k=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="log_w"):
        smc.resample_index(torch.full((2, 3), float("-inf")))
    with pytest.raises(ValueError, match="log_w"):
        smc.ancestors(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="scheme"):
        smc.ancestors(torch.zeros(1, 3), "residual")
    with pytest.raises(ValueError, match="n"):
        smc.smc(w.model, w.tokenizer, ["ab"], step, k=2, max_new_tokens=1).draw(n=0)
    with pytest.raises(ValueError, match="V\\^L"):
        smc.soft_values(torch.zeros(2, 10), torch.zeros(2, 10), 0.5, 3)
    with pytest.raises(ValueError, match="log_psi"):
        smc.guided_law(torch.zeros(2, 9), [torch.zeros(2, 1)], 3)
