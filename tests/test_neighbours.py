"""refimpl.bestofn, refimpl.dpo, refimpl.klpg: the neighbours of pi*, each against its closed form
on a finite support (brute-force enumeration, exact expectations, autograd over the support)."""
import itertools
import math

import pytest
import torch

from refimpl import bestofn, dpo, grpo, gvpo, kl, klpg, preferences, resample, rft, rl, tabular
from refimpl.rl import RLConfig

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _world(seed=0, P=3, N=6):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(torch.randn(P, N, generator=g, dtype=D), -1)
    reward = torch.rand(P, N, generator=g, dtype=D)
    return logp_ref, reward


# --- best-of-n ------------------------------------------------------------------------------------

def _brute_best_of_n(p, s, n):
    """Enumerate all N^n tuples; the kept draw is uniform among the draws with the top score."""
    out = [0.0] * len(p)
    for draws in itertools.product(range(len(p)), repeat=n):
        w = math.prod(p[i] for i in draws)
        top = max(s[i] for i in draws)
        tied = [i for i in draws if s[i] == top]
        for i in tied:
            out[i] += w / len(tied)
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("scores", [[0.3, 0.1, 0.7, 0.5], [1.0, 0.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 1.0, 1.0]])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_best_of_n_law_matches_brute_force(scores, n):
    g = torch.Generator().manual_seed(n)
    p = torch.softmax(torch.randn(4, generator=g, dtype=D), -1)
    p[2] = 0.0  # an impossible outcome, tied with another one in the second case
    p = p / p.sum()
    s = torch.tensor(scores, dtype=D)
    law = bestofn.best_of_n_law(p.log(), s, n)
    torch.testing.assert_close(law.exp(), _brute_best_of_n(p.tolist(), scores, n), rtol=0, atol=1e-12)
    assert torch.isneginf(law[2])


def test_best_of_n_law_is_batched_and_stable_for_huge_n():
    logp, scores = _world(P=4, N=7)
    scores[0, 3] = scores[0, 5]  # a tie in the first row
    law = bestofn.best_of_n_law(logp, scores, 10**6)
    assert torch.isfinite(law.exp()).all()
    torch.testing.assert_close(law.exp().sum(-1), torch.ones(4, dtype=D))
    top = scores.argmax(-1)
    assert (law.exp().gather(1, top[:, None]) > 1 - 1e-9).all()  # the argmax wins almost surely
    torch.testing.assert_close(kl.kl_divergence(law, logp)[1:], -logp[1:].gather(1, top[1:, None]).squeeze(1),
                               rtol=0, atol=1e-6)  # so the KL saturates at -log pi(argmax)
    torch.testing.assert_close(bestofn.best_of_n_law(logp, scores, 1), logp)  # n = 1: pi itself
    rows = torch.stack([bestofn.best_of_n_law(logp[i], scores[i], 7) for i in range(4)])
    torch.testing.assert_close(bestofn.best_of_n_law(logp, scores, 7), rows)


@pytest.mark.parametrize("seed", range(5))
def test_best_of_n_kl_is_below_the_bound(seed):
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(2, 40, (1,), generator=g))
    logp = torch.log_softmax(3 * torch.randn(N, generator=g, dtype=D), -1)
    scores = torch.randint(0, 5, (N,), generator=g).to(D) if seed % 2 else torch.rand(N, generator=g, dtype=D)
    for n in (1, 2, 4, 16, 256):
        kl_n = kl.kl_divergence(bestofn.best_of_n_law(logp, scores, n), logp).item()
        assert -1e-12 <= kl_n <= bestofn.best_of_n_kl_bound(n) + 1e-12
        assert kl_n <= math.log(n) + 1e-12  # P_n/pi <= n, pointwise


def test_best_of_n_bound_is_tight_only_when_atoms_vanish():
    g = torch.Generator().manual_seed(0)
    n = 16
    gaps = []
    for N in (4, 64, 4096):  # uniform pi, distinct scores: the largest atom is 1/N
        logp = torch.full((N,), -math.log(N), dtype=D)
        law = bestofn.best_of_n_law(logp, torch.rand(N, generator=g, dtype=D), n)
        gaps.append(bestofn.best_of_n_kl_bound(n) - kl.kl_divergence(law, logp).item())
    assert gaps[0] > 0.3 and gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4
    # Ties lower the KL: it is the KL between the laws of the tie classes.
    logp = torch.full((6,), -math.log(6), dtype=D)
    tied = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], dtype=D)
    classes = torch.full((3,), -math.log(3), dtype=D)
    kl_tied = kl.kl_divergence(bestofn.best_of_n_law(logp, tied, n), logp)
    torch.testing.assert_close(kl_tied, kl.kl_divergence(bestofn.best_of_n_law(classes, tied[::2], n), classes))
    distinct = kl.kl_divergence(bestofn.best_of_n_law(logp, torch.arange(6, dtype=D), n), logp)
    assert kl_tied < distinct < bestofn.best_of_n_kl_bound(n)


def test_soft_resampling_tends_to_best_of_n():
    logp, scores = _world(P=2, N=6)
    scores[1, 4] = scores[1, 1]  # resampling also splits ties uniformly: the same convention
    n = 4
    bon = bestofn.best_of_n_law(logp, scores, n)
    tv = []
    for beta in (0.1, 0.03, 0.003):  # (much smaller beta: the weights' range would exceed float64's)
        soft = resample.resampling_law(logp, scores / beta, [n], n_mc=20000, generator=torch.Generator().manual_seed(0))
        tv.append(kl.total_variation(soft[0], bon))
    assert (tv[0] > tv[1]).all() and (tv[1] > tv[2]).all() and (tv[2] < 5e-3).all()


# --- rejection sampling ---------------------------------------------------------------------------

def test_rejection_acceptance_is_z_times_exp_minus_r_max():
    logp_ref, reward = _world()
    for beta in (0.05, 0.3, 2.0):
        a = bestofn.rejection_acceptance(logp_ref, reward, beta, 1.0)
        torch.testing.assert_close(a, (kl.log_partition(logp_ref, reward, beta) - 1.0 / beta).exp())
        direct = (logp_ref.exp() * ((reward - 1.0) / beta).exp()).sum(-1)
        torch.testing.assert_close(a, direct)
    r_max = reward.amax(-1)  # the tightest envelope, one per row
    a = bestofn.rejection_acceptance(logp_ref, reward, 0.3, r_max)
    torch.testing.assert_close(a, (kl.log_partition(logp_ref, reward, 0.3) - r_max / 0.3).exp())
    assert (a > bestofn.rejection_acceptance(logp_ref, reward, 0.3, 1.0)).all()


def test_rejection_sampling_is_exact_and_costs_one_over_a():
    logp_ref, reward = _world()
    beta, N = 0.3, logp_ref.shape[-1]
    star = kl.optimal_policy(logp_ref, reward, beta).exp()
    a = bestofn.rejection_acceptance(logp_ref, reward, beta, 1.0)
    g = torch.Generator().manual_seed(0)
    expected_tv = lambda n: 0.5 * (star * (1 - star) / n).sqrt().sum(-1)  # ~ E[TV] of n exact draws
    tvs = []
    for n in (400, 40000):
        s = bestofn.rejection_sample(logp_ref, reward, beta, 1.0, n, generator=g)
        assert s.index.shape == (3, n) and s.index.min() >= 0 and s.index.max() < N
        emp = torch.nn.functional.one_hot(s.index, N).to(D).mean(1)
        tv = 0.5 * (emp - star).abs().sum(-1)
        assert (tv < 2.5 * expected_tv(n)).all()
        tvs.append(tv)
        sd = (n * (1 - a) / a**2).sqrt()  # proposals until the n-th acceptance: negative binomial
        assert ((s.proposals.to(D) - n / a).abs() < 5 * sd).all()
    assert (tvs[1] < tvs[0] / 3).all()  # 1/sqrt(n): 100x the draws, about a tenth of the TV


def test_capped_rejection_law_by_simulation_and_limits():
    logp_ref, reward = _world()
    beta, N = 0.3, logp_ref.shape[-1]
    star = kl.optimal_policy(logp_ref, reward, beta)
    torch.testing.assert_close(bestofn.rejection_law(logp_ref, reward, beta, 1.0, 1), logp_ref)  # n = 1: pi_ref
    torch.testing.assert_close(bestofn.rejection_law(logp_ref, reward, beta, 1.0, 10**5), star, rtol=0, atol=1e-9)
    a = bestofn.rejection_acceptance(logp_ref, reward, beta, 1.0)
    tv = [kl.total_variation(bestofn.rejection_law(logp_ref, reward, beta, 1.0, n), star) for n in (3, 4)]
    torch.testing.assert_close(tv[1] / tv[0], 1 - a)  # geometric: each proposal multiplies the distance by 1 - a
    # simulate: n proposals per trial, the first accepted one (or the last proposal)
    n, trials, g = 3, 200_000, torch.Generator().manual_seed(0)
    y = torch.multinomial(logp_ref.exp(), trials * n, replacement=True, generator=g).view(3, trials, n)
    ok = torch.rand(3, trials, n, generator=g, dtype=D) < ((reward - 1.0) / beta).exp().gather(1, y.view(3, -1)).view(3, trials, n)
    first = torch.where(ok.any(-1), ok.long().argmax(-1), torch.full((3, trials), n - 1))  # [3, trials]
    kept = y.gather(2, first[..., None]).squeeze(-1)
    emp = torch.nn.functional.one_hot(kept, N).to(D).mean(1)
    law = bestofn.rejection_law(logp_ref, reward, beta, 1.0, n).exp()
    assert (emp - law).abs().max() < 4e-3


def test_rejection_sampling_checks_its_envelope():
    logp_ref, reward = _world()
    with pytest.raises(ValueError, match="r_max"):
        bestofn.rejection_sample(logp_ref, reward, 0.3, 0.5, 10)
    with pytest.raises(ValueError, match="r_max"):
        bestofn.rejection_acceptance(logp_ref, reward, 0.3, reward.amax(-1) - 1e-3)
    with pytest.raises(ValueError, match="max_proposals"):
        bestofn.rejection_sample(logp_ref, reward - 50.0, 0.1, 0.0, 10)  # a ~ e^-500
    logp_ref[0, 0] = -math.inf  # off the support, a reward above r_max is harmless
    reward[0, 0] = 5.0
    s = bestofn.rejection_sample(logp_ref, reward, 0.3, 1.0, 200, generator=torch.Generator().manual_seed(0))
    assert not (s.index[0] == 0).any()


# --- DPO --------------------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    lc, lr_, rc, rr = (torch.tensor(v, dtype=D) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    beta = 0.5
    margins = [beta * ((-1 + 2) - (-3 + 2)), beta * ((-2 + 2) - (-1 + 2))]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 2
    assert dpo.dpo_loss(lc, lr_, rc, rr, beta).item() == pytest.approx(expected, abs=1e-12)
    assert dpo.dpo_loss(rc, rr, rc, rr, beta).item() == pytest.approx(math.log(2), abs=1e-12)  # pi = pi_ref


def test_sampled_pairs_follow_bradley_terry_and_their_table_is_the_mean_loss():
    logp_ref, reward = _world(N=4)
    T = 0.2
    pairs = dpo.preference_pairs(logp_ref, reward, 200_000, label_temperature=T, generator=torch.Generator().manual_seed(0))
    W = dpo.preference_table(logp_ref, reward, label_temperature=T)
    torch.testing.assert_close(W.sum((-2, -1)), torch.ones(3, dtype=D))
    emp = dpo.pair_table(pairs, 4)
    assert (emp - W).abs().max().item() < 5e-3
    logp = torch.log_softmax(torch.randn(3, 4, dtype=D), -1)
    few = dpo.Pairs(pairs.chosen[:, :50], pairs.rejected[:, :50])
    mean_loss = [dpo.dpo_loss(logp[p, few.chosen[p]], logp[p, few.rejected[p]], logp_ref[p, few.chosen[p]],
                              logp_ref[p, few.rejected[p]], 0.7) for p in range(3)]
    table_loss = dpo._table_loss(logp, logp_ref, dpo.pair_table(few, 4), 0.7)
    torch.testing.assert_close(table_loss, torch.stack(mean_loss))


@pytest.mark.parametrize("beta, T, precondition", [(0.5, 1.0, False), (1.0, 0.3, False), (0.05, 1.0, True)])
def test_population_dpo_optimum_is_pi_star_of_beta_times_T(beta, T, precondition):
    logp_ref, reward = _world(N=5)
    W = dpo.preference_table(logp_ref, reward, T)
    steps, lr = (80, 1.0) if precondition else (600, 5 / beta**2)
    run = dpo.train_dpo_tabular(logp_ref, W, beta, steps=steps, lr=lr, precondition=precondition)
    assert kl.kl_divergence(run.logp, kl.optimal_policy(logp_ref, reward, beta * T)).max().item() < 1e-10
    assert run.loss[-1] < run.loss[0]
    # It is the minimiser: the population loss rises in every direction around it.
    base = dpo.dpo_population_loss(run.logp, logp_ref, reward, beta, T)
    for _ in range(5):
        moved = torch.log_softmax(run.logp + 0.05 * torch.randn_like(run.logp), -1)
        assert (dpo.dpo_population_loss(moved, logp_ref, reward, beta, T) > base).all()
    if T != 1.0:  # labels at temperature T != 1 do not give pi* of beta
        assert kl.kl_divergence(run.logp, kl.optimal_policy(logp_ref, reward, beta)).min().item() > 1e-2


def test_sampled_pairs_optimum_is_not_pi_star():
    logp_ref = torch.log_softmax(torch.zeros(1, 4, dtype=D), -1)  # uniform: every ordered pair gets drawn
    reward = torch.tensor([[0.0, 0.3, 0.6, 1.0]], dtype=D)
    beta = 0.5
    star = kl.optimal_policy(logp_ref, reward, beta)
    gaps = []
    for M, seed in ((300, 0), (30_000, 1)):
        pairs = dpo.preference_pairs(logp_ref, reward, M, generator=torch.Generator().manual_seed(seed))
        run = dpo.train_dpo_tabular(logp_ref, pairs, beta, steps=1500, lr=20.0)
        W = dpo.pair_table(pairs, 4)
        assert (W + W.transpose(-1, -2) > 0).all()  # every pair seen: a finite optimum exists
        theta = run.logp.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(dpo._table_loss(theta, logp_ref, W, beta).sum(), theta)
        assert grad.abs().max().item() < 1e-8  # converged: this is the empirical optimum
        gaps.append(kl.kl_divergence(run.logp, star).item())
    assert gaps[0] > 1e-3 and gaps[1] < gaps[0] / 10


def test_limited_coverage_leaves_uncovered_logits_at_their_start():
    logp_ref, reward = _world(N=6)
    beta = 0.5
    covered = torch.tensor([True, True, True, False, True, False])
    logp_data = logp_ref.masked_fill(~covered, -math.inf)  # pairs only among the covered outcomes
    W = dpo.preference_table(logp_ref, reward, logp_data=logp_data)
    run = dpo.train_dpo_tabular(logp_ref, W, beta, steps=1500, lr=20.0)
    star = kl.optimal_policy(logp_ref, reward, beta)
    h = run.logp - logp_ref  # the uncovered outcomes share one log-ratio: only the normaliser moved them
    torch.testing.assert_close(h[:, 3], h[:, 5], rtol=0, atol=1e-12)
    cond = lambda lp: torch.log_softmax(lp[:, covered], -1)
    assert kl.kl_divergence(cond(run.logp), cond(star)).max().item() < 1e-8  # pi* on the covered part
    assert kl.kl_divergence(run.logp, star).max().item() > 1e-3  # but not pi*
    # Sampled pairs: outcomes never drawn keep their logits, exactly.
    pairs = dpo.preference_pairs(logp_ref, reward, 3, generator=torch.Generator().manual_seed(0))
    run = dpo.train_dpo_tabular(logp_ref, pairs, beta, steps=50, lr=1.0)
    for p in range(3):
        unseen = torch.ones(6, dtype=torch.bool)
        unseen[pairs.chosen[p]] = unseen[pairs.rejected[p]] = False
        h = run.logp[p, unseen] - logp_ref[p, unseen]
        torch.testing.assert_close(h, h[:1].expand_as(h), rtol=0, atol=1e-12)


def _binary_world(P=4, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(torch.randn(P, N, generator=g, dtype=D), -1)
    reward = (torch.rand(P, N, generator=g, dtype=D) < 0.4).to(D)
    reward[-1] = 1.0  # a prompt where every completion ties
    return logp_ref, reward


def test_hard_labels_drop_ties_and_agree_with_the_reward():
    logp_ref, reward = _binary_world()
    pairs = dpo.preference_pairs(logp_ref, reward, 5000, generator=torch.Generator().manual_seed(0), labels="hard")
    rc, rr = reward.gather(1, pairs.chosen), reward.gather(1, pairs.rejected)
    assert (rc[:-1] > rr[:-1]).all()  # no tied pair kept, every label agrees with the reward
    assert (pairs.chosen[-1] == pairs.rejected[-1]).all()  # all tie: null pairs (no gradient)
    W = dpo.preference_table(logp_ref, reward, labels="hard")
    torch.testing.assert_close(W.sum((-2, -1)), torch.ones(4, dtype=D))
    assert (dpo.pair_table(pairs, 8) - W).abs().max().item() < 0.03  # the sampled law is the table's
    mu = logp_ref.exp()  # W ∝ mu(a) mu(b) on the untied, correctly ordered pairs
    want = mu.unsqueeze(-1) * mu.unsqueeze(-2) * (reward.unsqueeze(-1) > reward.unsqueeze(-2))
    torch.testing.assert_close(W[:-1], want[:-1] / want[:-1].sum((-2, -1), keepdim=True))
    with pytest.raises(ValueError, match="label_temperature"):
        dpo.preference_pairs(logp_ref, reward, 4, label_temperature=0.5, labels="hard")
    with pytest.raises(ValueError, match="labels"):
        preferences.preference_table(logp_ref, reward, labels="soft")
    # DPO on hard labels has no finite optimum: the loss keeps falling and the reward gap keeps growing
    run = dpo.train_dpo_tabular(logp_ref[:1], W[:1], 0.5, steps=400, lr=0.5, precondition=True)
    assert run.loss[-1] < run.loss[-100] < run.loss[0]


def test_bradley_terry_labels_on_binary_rewards_are_mostly_coin_flips():
    """BT at T = 1 on 0/1 rewards: P(tie) = p² + (1-p)² >= ½ (each tie a coin flip), and sigma(-1) of the
    informative pairs flipped; the sampled counts match within 5 binomial standard deviations."""
    logp_ref, reward = _binary_world()
    noise = dpo.label_noise(logp_ref, reward)
    p = (logp_ref.exp() * reward).sum(-1)
    torch.testing.assert_close(noise.tied, p**2 + (1 - p) ** 2)
    assert (noise.tied >= 0.5).all()
    torch.testing.assert_close(noise.flipped[:-1], torch.full((3,), torch.sigmoid(torch.tensor(-1.0, dtype=D)).item(),
                                                               dtype=D))
    assert noise.flipped[-1] == 0  # no informative pair
    M = 20_000
    pairs = dpo.preference_pairs(logp_ref, reward, M, generator=torch.Generator().manual_seed(1))
    rc, rr = reward.gather(1, pairs.chosen), reward.gather(1, pairs.rejected)
    tied = (rc == rr).sum(-1).to(D)
    assert ((tied - M * noise.tied).abs() <= 5 * (M * noise.tied * (1 - noise.tied)).clamp_min(0).sqrt() + 1e-6).all()
    informative = M - tied[:-1]
    flipped = (rc < rr).sum(-1).to(D)[:-1]
    q = noise.flipped[:-1]
    assert ((flipped - informative * q).abs() <= 5 * (informative * q * (1 - q)).sqrt()).all()
    assert (noise.tied + (1 - noise.tied) * noise.flipped > 0.5).all()  # at least half the labels are not r's


# --- KL-regularised policy gradient -----------------------------------------------------------------

def test_kl_estimators_expectations():
    logp_ref, _ = _world()
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(logp_ref + torch.randn(3, 6, generator=g, dtype=D), -1)
    est = klpg.kl_estimators(logp, logp_ref)
    pi, KL = logp.exp(), kl.kl_divergence(logp, logp_ref)
    torch.testing.assert_close((pi * est.k1).sum(-1), KL)
    torch.testing.assert_close((pi * est.k3).sum(-1), KL)
    assert (est.k3 >= 0).all() and (est.k1 < 0).any()
    assert ((pi * est.k2).sum(-1) - KL).abs().min().item() > 1e-3  # k2 is biased
    # ... to third order: along pi_eps = softmax(log pi_ref + eps·v), E[k2] - KL = O(eps^3), KL = O(eps^2).
    v = torch.randn(3, 6, generator=g, dtype=D)
    gap = []
    for eps in (1e-2, 5e-3):
        lp = torch.log_softmax(logp_ref + eps * v, -1)
        gap.append(((lp.exp() * klpg.kl_estimators(lp, logp_ref).k2).sum(-1) - kl.kl_divergence(lp, logp_ref)).abs())
    ratio = gap[0] / gap[1]
    assert ((ratio > 7) & (ratio < 9)).all()


def _objective_gradients(theta, logp_ref, reward, beta):
    def grad(f):
        t = theta.clone().requires_grad_(True)
        (out,) = torch.autograd.grad(f(torch.log_softmax(t, -1)).sum(), t)
        return out
    expected_r = lambda lp: (lp.exp() * reward).sum(-1)
    return {
        "k1_reward": grad(lambda lp: -kl.regularized_objective(lp, logp_ref, reward, beta)),  # -∇J
        "k2_loss": grad(lambda lp: -kl.regularized_objective(lp, logp_ref, reward, beta)),  # -∇J too
        "k1_loss": grad(lambda lp: -expected_r(lp)),  # the penalty vanishes in expectation
        "k3_loss": grad(lambda lp: -expected_r(lp) + beta * kl.kl_divergence(logp_ref, lp)),  # forward KL
    }


@pytest.mark.parametrize("seed", range(3))
def test_expected_gradients_are_the_closed_forms(seed):
    logp_ref, reward = _world(seed)
    theta = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed + 10), dtype=D)
    beta = 0.3
    closed = _objective_gradients(theta, logp_ref, reward, beta)
    for estimator in klpg.ESTIMATORS:
        torch.testing.assert_close(klpg.expected_gradient(theta, logp_ref, reward, beta, estimator), closed[estimator],
                                   rtol=0, atol=1e-12)
    # the KL term alone (r = 0): k1 as a loss has no gradient at all, k3's is not the reverse KL's
    zero = torch.zeros_like(reward)
    assert klpg.expected_gradient(theta, logp_ref, zero, beta, "k1_loss").abs().max().item() < 1e-15
    diff = klpg.expected_gradient(theta, logp_ref, zero, beta, "k3_loss") - closed["k1_reward"] + closed["k1_loss"]
    assert diff.abs().max().item() > 1e-2


def _sampled_gradient(theta, logp_ref, reward, beta, k, estimator, baseline, groups=20000, batches=20, seed=0,
                      advantages=None):
    """Mean and standard error of the gradient of kl_pg_loss over on-policy groups of one prompt."""
    g = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(batches):
        t = theta.clone().requires_grad_(True)
        logp_all = torch.log_softmax(t, -1)  # [N]
        idx = torch.multinomial(logp_all.detach().exp(), groups // batches * k, replacement=True, generator=g).view(-1, k)
        if advantages is None:
            loss = klpg.kl_pg_loss(logp_all[idx], logp_ref[idx], reward[idx], beta, estimator, baseline)
        else:  # a custom baseline on the plain reward (no penalty)
            loss = -(advantages(reward[idx]) * logp_all[idx]).mean()
        (grad,) = torch.autograd.grad(loss, t)
        means.append(grad)
    means = torch.stack(means)
    return means.mean(0), means.std(0) / batches**0.5


@pytest.mark.parametrize("estimator", klpg.ESTIMATORS)
@pytest.mark.parametrize("baseline", klpg.BASELINES)
def test_sampled_gradients_are_unbiased(estimator, baseline):
    logp_ref, reward = _world(N=5)
    logp_ref, reward = logp_ref[0], reward[0]
    theta = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=D)
    mean, se = _sampled_gradient(theta, logp_ref, reward, 0.3, 4, estimator, baseline)
    exact = klpg.expected_gradient(theta, logp_ref, reward, 0.3, estimator)
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all()


def test_group_mean_baseline_is_biased_and_rloo_lowers_variance():
    logp_ref, reward = _world(N=5)
    logp_ref, reward = logp_ref[0], reward[0]
    theta = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=D)
    k = 4
    exact = klpg.expected_gradient(theta, logp_ref, reward, 1.0, "k1_loss")  # -∇E[r]: no penalty
    mean, se = _sampled_gradient(theta, logp_ref, reward, 1.0, k, None, None,
                                 advantages=lambda r: grpo.group_advantages(r, scale=False))
    assert ((mean - exact).abs() > 5 * se).any()  # the group mean contains R_i itself: biased ...
    assert ((mean - (k - 1) / k * exact).abs() <= 5 * se + 1e-12).all()  # ... by exactly (k-1)/k
    _, se_rloo = _sampled_gradient(theta, logp_ref, 10 + reward, 1.0, k, "k1_loss", "rloo")
    _, se_none = _sampled_gradient(theta, logp_ref, 10 + reward, 1.0, k, "k1_loss", "none")
    assert (se_rloo < se_none / 5).all()  # a reward offset of 10 is noise that RLOO removes


def test_rloo_advantages_by_hand():
    adv = klpg.rloo_advantages(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]], dtype=D))
    torch.testing.assert_close(adv, torch.tensor([[-1.5, 0.0, 1.5], [-3.0, -3.0, 6.0]], dtype=D))


def test_forward_kl_optimum_is_the_k3_fixed_point():
    logp_ref, reward = _world()
    beta = 0.3
    fwd = klpg.forward_kl_optimum(logp_ref, reward, beta)
    torch.testing.assert_close(fwd.exp().sum(-1), torch.ones(3, dtype=D))
    assert klpg.expected_gradient(fwd, logp_ref, reward, beta, "k3_loss").abs().max().item() < 1e-10
    objective = lambda lp: (lp.exp() * reward).sum(-1) - beta * kl.kl_divergence(logp_ref, lp)
    for _ in range(5):
        assert (objective(torch.log_softmax(fwd + 0.1 * torch.randn_like(fwd), -1)) < objective(fwd)).all()
    ratio = (fwd - logp_ref).exp()  # pi_fwd / pi_ref = beta / (lambda - r): 1/ratio is affine in r
    slope = (1 / ratio).diff(dim=-1) / reward.diff(dim=-1)
    torch.testing.assert_close(slope, torch.full_like(slope, -1 / beta))
    assert kl.kl_divergence(fwd, kl.optimal_policy(logp_ref, reward, beta)).min().item() > 1e-3
    flat = klpg.forward_kl_optimum(logp_ref, torch.ones_like(reward), beta)  # no reward signal: pi_ref
    torch.testing.assert_close(flat, logp_ref)
    # Descending the exact expected gradient of each usage reaches its fixed point.
    targets = {"k1_reward": kl.optimal_policy(logp_ref, reward, beta), "k3_loss": fwd}
    for estimator, target in targets.items():
        theta = logp_ref.clone()
        for _ in range(500):
            theta = theta - 5.0 * klpg.expected_gradient(theta, logp_ref, reward, beta, estimator)
        assert kl.kl_divergence(torch.log_softmax(theta, -1), target).max().item() < 1e-10


def _train_klpg(logp_ref, reward, beta, lr, estimator):
    return tabular.train_tabular(logp_ref, reward, RLConfig(loss="kl_pg", beta=beta, k=8, steps=600, lr=lr,
                                                            kl_estimator=estimator))


def test_training_reaches_each_usage_fixed_point():
    logp_ref, reward = _world()
    beta = 0.3
    star = kl.optimal_policy(logp_ref, reward, beta)
    fwd = klpg.forward_kl_optimum(logp_ref, reward, beta)
    run = _train_klpg(logp_ref, reward, beta, 5.0, "k1_reward")
    assert len(run.history) == 600
    # r - beta·k1 is the constant beta·log Z at pi*: RLOO advantages vanish there, so does the noise
    assert kl.kl_divergence(run.logp, star).max().item() < 1e-10
    run = _train_klpg(logp_ref, reward, beta, 1.0, "k3_loss")
    tail = torch.stack(run.history[-200:]).exp().mean(0).log()  # the iterates jitter around the fixed point
    assert kl.kl_divergence(tail, fwd).max().item() < 2e-3
    assert kl.kl_divergence(tail, star).max().item() > 0.05
    run = _train_klpg(logp_ref, reward, beta, 1.0, "k1_loss")
    assert kl.kl_divergence(run.logp, logp_ref).min().item() > kl.kl_divergence(star, logp_ref).max().item()


def test_kl_pg_entry_of_the_loss_table_is_kl_pg_loss_on_sequence_sums():
    """rl.LOSSES["kl_pg"] on per-token log-probs = klpg.kl_pg_loss on their sums, value and gradient."""
    g = torch.Generator().manual_seed(3)
    tok = torch.randn(2, 4, 3, dtype=torch.float64, generator=g).requires_grad_()
    ref_tok = torch.randn(2, 4, 3, dtype=torch.float64, generator=g)
    rewards = torch.rand(2, 4, dtype=torch.float64, generator=g)
    mask = torch.ones_like(ref_tok)
    for est in klpg.ESTIMATORS:
        for base in klpg.BASELINES:
            c = RLConfig(loss="kl_pg", beta=0.3, k=4, kl_estimator=est, kl_baseline=base)
            b = rl.GroupBatch(tok, tok.detach(), tok.detach(), ref_tok, mask, rewards, 3)
            got = torch.autograd.grad(rl.LOSSES["kl_pg"].fn(b, c), tok)[0]
            want = torch.autograd.grad(klpg.kl_pg_loss(tok.sum(-1), ref_tok.sum(-1), rewards, 0.3, est, base), tok)[0]
            assert torch.allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError, match="kl_estimator"):
        RLConfig(loss="kl_pg", kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_estimator"):
        RLConfig(loss="gvpo", kl_estimator="k3_loss")  # an option GVPO does not read
    for off_policy in (dict(minibatches=2, prompts_per_step=16), dict(epochs=2), dict(staleness=1), dict(replay=1)):
        assert RLConfig(loss="kl_pg", **off_policy).loss == "kl_pg"  # off-policy data is accepted (see below)
    run = tabular.train_tabular(torch.zeros(2, 3), torch.zeros(2, 3), RLConfig(loss="kl_pg", steps=2), sampling="uniform")
    assert len(run.history) == 2


def test_kl_pg_off_policy_fixed_point_needs_the_rloo_baseline():
    """From any full-support sampler mu, E[grad] of k1-in-the-reward with RLOO is mu ⊙ (s - E_mu s): zero at
    pi*; without a baseline it is mu ⊙ s - E_mu[s]·pi, which is not, so descent stops elsewhere."""
    logp_ref, reward = _world()
    beta = 0.5
    star = kl.optimal_policy(logp_ref, reward, beta)
    for sampler in (torch.zeros_like(logp_ref), logp_ref):  # uniform, and a stale snapshot (pi_ref)
        g = lambda lp, base: klpg.expected_gradient(lp, logp_ref, reward, beta, "k1_reward", logp_sampler=sampler,
                                                    baseline=base)  # noqa: E731
        assert g(star, "rloo").abs().max().item() < 1e-15
        assert g(star, "none").abs().max().item() > 1e-2
        theta = logp_ref.clone()
        for _ in range(3000):
            theta = theta - 5.0 * g(theta, "none")
        assert g(theta, "none").abs().max().item() < 1e-10  # a fixed point ...
        assert kl.kl_divergence(torch.log_softmax(theta, -1), star).min().item() > 1e-2  # ... that is not pi*
        s = reward - beta * (torch.log_softmax(theta, -1) - logp_ref)
        mu, pi = sampler.softmax(-1), torch.log_softmax(theta, -1).exp()
        torch.testing.assert_close(mu * s, (mu * s).sum(-1, keepdim=True) * pi)  # its condition (eq. off-none)
    # on-policy the baseline changes nothing in expectation
    theta = torch.randn(3, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    for est in klpg.ESTIMATORS:
        torch.testing.assert_close(klpg.expected_gradient(theta, logp_ref, reward, beta, est, baseline="rloo"),
                                   klpg.expected_gradient(theta, logp_ref, reward, beta, est), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="logp_sampler"):
        klpg.expected_gradient(theta, logp_ref, reward, beta, "k1_reward", logp_sampler=torch.full_like(theta, -math.inf))


def test_expected_off_policy_gradient_is_the_mean_over_all_groups():
    """k = 2 groups enumerated exactly under mu⊗mu: the mean GVPO-reference gradient is beta times the
    off-policy expected KL-PG (RLOO) gradient."""
    logp_ref, reward = _world(N=5)
    logp_ref, reward = logp_ref[0], reward[0]
    g = torch.Generator().manual_seed(2)
    theta, mu = torch.randn(5, generator=g, dtype=D), torch.softmax(torch.randn(5, generator=g, dtype=D), -1)
    total = torch.zeros(5, dtype=D)
    for i, j in itertools.product(range(5), repeat=2):
        t = theta.clone().requires_grad_(True)
        idx = torch.tensor([[i, j]])
        loss = gvpo.gvpo_loss(torch.log_softmax(t, -1)[idx], logp_ref[idx], reward[idx], 0.3)
        total += mu[i] * mu[j] * torch.autograd.grad(loss, t)[0]
    exact = klpg.expected_gradient(theta, logp_ref, reward, 0.3, "k1_reward", logp_sampler=mu.log(), baseline="rloo")
    torch.testing.assert_close(total, 0.3 * exact, rtol=0, atol=1e-15)


def test_dpo_on_a_language_model_raises_the_margin_of_its_pairs(arith_model):
    """rft.finetune_dpo: the first loss is log 2 (policy = reference), the loss falls, the implicit reward
    margin beta·[h(chosen) - h(rejected)] of the training pairs grows; same seed, same run."""
    from refimpl import lm, load_model
    from refimpl.worlds import arith

    ref, tok = arith_model
    prompts, targets = arith.prompts("train", n=8)
    s = lm.sample(ref, tok, prompts, k=6, max_new_tokens=arith.MAX_NEW_TOKENS, seed=0)
    # two different completions of one prompt, the text first in sorted order chosen: one consistent
    # preference (ordered by row, the same two texts can come in both orders, a loss floor at log 2)
    rows = [(p * 6 + i, p * 6 + j) for p in range(8) for i in range(6) for j in range(i + 1, 6)]
    pairs = [sorted(ab, key=lambda r: s.texts[r]) for ab in rows if s.texts[ab[0]] != s.texts[ab[1]]]
    assert len(pairs) >= 16
    chosen, rejected = torch.tensor(pairs).T

    def margin(model):
        with torch.no_grad():
            lp = lm.sequence_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)[0]
        return lp[chosen] - lp[rejected]

    runs = []
    for _ in range(2):
        policy, _ = load_model("refimpl/toy-arith", device="cpu")
        seen = []
        losses = rft.finetune_dpo(policy, ref, s, chosen, rejected, beta=0.5, steps=30, lr=1e-3, batch_size=8,
                                  callback=lambda step, _: seen.append(step))
        runs.append(losses)
    assert seen == list(range(1, 31)) and runs[0] == runs[1]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(2)
    assert (margin(policy) - margin(ref)).mean() > 1.0
    with pytest.raises(ValueError, match="same prompt"):
        rft.finetune_dpo(policy, ref, s, torch.tensor([0]), torch.tensor([6]), beta=0.5, steps=1)
    with pytest.raises(ValueError, match="rejected"):
        rft.finetune_dpo(policy, ref, s, torch.tensor([0]), torch.tensor([48]), beta=0.5, steps=1)
    with pytest.raises(TypeError, match="chosen"):
        rft.finetune_dpo(policy, ref, s, torch.tensor([0.0]), torch.tensor([1]), beta=0.5, steps=1)
    with pytest.raises(ValueError, match="different rows"):
        rft.finetune_dpo(policy, ref, s, torch.tensor([0]), torch.tensor([0]), beta=0.5, steps=1)


# --- validation -------------------------------------------------------------------------------------

def test_bad_arguments_are_named():
    logp_ref, reward = _world()
    with pytest.raises(ValueError, match="n must"):
        bestofn.best_of_n_law(logp_ref, reward, 0)
    with pytest.raises(ValueError, match="scores"):
        bestofn.best_of_n_law(logp_ref, reward[:, :3], 2)
    with pytest.raises(ValueError, match="logp"):
        bestofn.best_of_n_law(torch.full((2, 3), -math.inf, dtype=D), torch.zeros(2, 3, dtype=D), 2)
    with pytest.raises(ValueError, match="label_temperature"):
        dpo.preference_pairs(logp_ref, reward, 4, label_temperature=-1.0)
    with pytest.raises(ValueError, match="logp_ref"):
        dpo.preference_table(logp_ref.masked_fill(reward > 0.5, -math.inf), reward)
    with pytest.raises(ValueError, match="pairs"):
        dpo.train_dpo_tabular(logp_ref, torch.ones(3, 6, 6, dtype=D), 0.1, 1, 1.0)
    with pytest.raises(ValueError, match="estimator"):
        klpg.kl_pg_loss(logp_ref, logp_ref, reward, 0.1, estimator="k3_reward")
    with pytest.raises(ValueError, match="k >= 2"):
        klpg.kl_pg_loss(logp_ref[:, :1], logp_ref[:, :1], reward[:, :1], 0.1)
    klpg.kl_pg_loss(logp_ref[:, :1], logp_ref[:, :1], reward[:, :1], 0.1, baseline="none")  # fine without RLOO
    with pytest.raises(ValueError, match="overflows"):
        klpg.kl_estimators(torch.tensor([-200.0]), torch.tensor([0.0]))
