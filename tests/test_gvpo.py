"""refimpl.gvpo, refimpl.grpo and refimpl.rl: the gradient identity, invariances, convergence to pi*,
baselines, the loss table, validation."""
import copy
import math

import pytest
import torch

from refimpl import frontier, grpo, gvpo, kl, rl, tabular
from refimpl.rl import RLConfig



pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _groups(P=3, k=5, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(P, k, generator=g, dtype=dtype)).to(device).requires_grad_(True)
    logp_anchor = (-3 * torch.rand(P, k, generator=g, dtype=dtype)).to(device)
    rewards = torch.rand(P, k, generator=g, dtype=dtype).to(device)
    return logp, logp_anchor, rewards


def test_gradient_identity_with_respect_to_logp():
    logp, logp_anchor, rewards = _groups()
    beta = 0.3
    gvpo.gvpo_loss(logp, logp_anchor, rewards, beta).backward()
    P, k = logp.shape
    w = gvpo.gvpo_weights(logp, logp_anchor, rewards, beta)
    expected = -beta / (k - 1) * w / P  # d L / d logp_i
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-14)


def test_gradient_identity_through_a_policy():
    """∇_theta L = -beta/(k-1) · sum_i w_i ∇_theta log pi_theta(y_i) / P for a softmax policy."""
    g = torch.Generator().manual_seed(1)
    P, N, k, beta = 2, 7, 4, 0.2
    theta = torch.randn(P, N, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(N, (P, k), generator=g)
    rows = torch.arange(P).unsqueeze(1)
    logp_anchor = torch.log_softmax(torch.randn(P, N, generator=g, dtype=torch.float64), -1)[rows, idx]
    rewards = torch.rand(P, k, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(theta, -1)[rows, idx]
    (grad,) = torch.autograd.grad(gvpo.gvpo_loss(logp, logp_anchor, rewards, beta), theta, retain_graph=True)
    w = gvpo.gvpo_weights(logp, logp_anchor, rewards, beta)
    formula = torch.zeros_like(theta)
    for p in range(P):
        for i in range(k):
            (g_i,) = torch.autograd.grad(logp[p, i], theta, retain_graph=True)
            formula -= beta / (k - 1) * w[p, i] * g_i / P
    torch.testing.assert_close(grad, formula, rtol=1e-12, atol=1e-14)


def test_weights_are_centred_and_detached():
    logp, logp_anchor, rewards = _groups()
    w = gvpo.gvpo_weights(logp, logp_anchor, rewards, 0.1)
    assert not w.requires_grad
    torch.testing.assert_close(w.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_invariant_to_group_constants():
    logp, logp_anchor, rewards = _groups()
    beta = 0.1
    base = gvpo.gvpo_loss(logp, logp_anchor, rewards, beta)
    shift = torch.tensor([[1.5], [-2.0], [7.0]], dtype=torch.float64)  # one constant per group
    torch.testing.assert_close(gvpo.gvpo_loss(logp, logp_anchor, rewards + shift, beta), base)
    torch.testing.assert_close(gvpo.gvpo_loss(logp + shift, logp_anchor, rewards, beta), base)
    torch.testing.assert_close(gvpo.gvpo_loss(logp, logp_anchor - shift, rewards, beta), base)


def test_loss_vanishes_exactly_at_the_implicit_reward():
    logp, logp_anchor, rewards = _groups()
    beta = 0.25
    logp_star = logp_anchor + rewards / beta - 3.0  # beta·rho = R + const
    assert gvpo.gvpo_loss(logp_star, logp_anchor, rewards, beta).item() < 1e-20
    assert gvpo.gvpo_weights(logp_star, logp_anchor, rewards, beta).abs().max().item() < 1e-12


def test_k2_is_a_squared_margin():
    logp, logp_anchor, rewards = _groups(k=2)
    beta = 0.5
    rho = logp - logp_anchor
    margin = beta * (rho[:, 0] - rho[:, 1]) - (rewards[:, 0] - rewards[:, 1])
    torch.testing.assert_close(gvpo.gvpo_loss(logp, logp_anchor, rewards, beta), (0.25 * margin**2).mean())


def _small_world(seed=0, P=3, N=6):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(torch.randn(P, N, generator=g, dtype=torch.float64), -1)
    reward = torch.rand(P, N, generator=g, dtype=torch.float64)
    return logp_ref, reward


@pytest.mark.parametrize("sampling", ["policy", "uniform", "reference"])
def test_tabular_gvpo_reaches_the_optimum(sampling):
    logp_ref, reward = _small_world()
    beta = 0.5
    logp_star = kl.optimal_policy(logp_ref, reward, beta)
    logp, _ = tabular.train_tabular(logp_ref, reward, RLConfig(beta=beta, k=8, steps=800, lr=10.0), sampling=sampling)
    assert kl.kl_divergence(logp, logp_star).max().item() < 1e-4
    assert kl.kl_divergence(logp_ref, logp_star).min().item() > 1e-2  # it had somewhere to go


def test_old_anchor_does_not_reach_the_optimum():
    logp_ref, reward = _small_world()
    beta = 0.5
    logp_star = kl.optimal_policy(logp_ref, reward, beta)
    logp, _ = tabular.train_tabular(logp_ref, reward, RLConfig(beta=beta, anchor="old", k=8, steps=800, lr=10.0))
    assert kl.kl_divergence(logp, logp_star).mean().item() > 0.1


def test_grpo_matches_hand_computation():
    # One prompt, k = 2, T = 2 tokens; second token of completion 1 is padding.
    logp_tok = torch.tensor([[[-1.0, -2.0], [-0.5, 0.0]]], dtype=torch.float64)
    logp_old = torch.tensor([[[-1.5, -2.0], [-0.2, 0.0]]], dtype=torch.float64)
    logp_ref = torch.tensor([[[-1.0, -1.0], [-1.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # A = ±0.5 / (std = sqrt(0.5) + 1e-4).
    A = 0.5 / (0.5**0.5 + 1e-4)
    r1 = [math.exp(0.5), 1.0]  # ratios of completion 1
    s1 = (min(r1[0] * A, 1.2 * A) + min(r1[1] * A, 1.2 * A)) / 2  # clipped at 1 + eps
    r2 = math.exp(-0.3)
    s2 = min(r2 * -A, max(r2, 0.8) * -A)  # clipped at 1 - eps
    expected = -(s1 + s2) / 2
    got = grpo.grpo_loss(logp_tok, logp_old, mask, rewards, clip_eps=0.2)
    assert abs(got.item() - expected) < 1e-10
    # k3 penalty: d = log(pi_ref/pi_theta) per real token, k3 = e^d - d - 1.
    k3 = lambda d: math.exp(d) - d - 1
    kl1 = (k3(0.0) + k3(1.0)) / 2
    kl2 = k3(-0.5)
    got_kl = grpo.grpo_loss(logp_tok, logp_old, mask, rewards, 0.2, kl_coef=0.1, logp_ref_tok=logp_ref)
    assert abs(got_kl.item() - (expected + 0.1 * (kl1 + kl2) / 2)) < 1e-10
    # Dr. GRPO: A = ±0.5, token sums over P·k·T_max = 1·2·2.
    r_tok = [(r1[0], 0.5), (r1[1], 0.5), (r2, -0.5)]
    terms = [min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in r_tok]
    got_dr = grpo.dr_grpo_loss(logp_tok, logp_old, mask, rewards, 0.2)
    assert abs(got_dr.item() + sum(terms) / 4) < 1e-10


def test_group_advantages_all_equal_is_zero():
    adv = grpo.group_advantages(torch.ones(2, 4))
    assert torch.equal(adv, torch.zeros(2, 4))


@pytest.mark.parametrize("bad, name", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"),
    (dict(logp=torch.zeros(2, 1), logp_anchor=torch.zeros(2, 1), rewards=torch.zeros(2, 1)), "k"),
    (dict(rewards=torch.zeros(2, 4)), "rewards"),
    (dict(rewards=torch.tensor([[0.0, float("nan"), 0.0]] * 2)), "rewards"),
    (dict(logp_anchor=torch.full((2, 3), float("-inf"))), "logp_anchor"),
])
def test_validation(bad, name):
    args = dict(logp=torch.zeros(2, 3), logp_anchor=torch.zeros(2, 3), rewards=torch.zeros(2, 3), beta=0.1)
    args.update(bad)
    for fn in (gvpo.gvpo_loss, gvpo.gvpo_weights):
        with pytest.raises(ValueError, match=name):
            fn(**args)


def test_validation_types_and_config():
    with pytest.raises(TypeError, match="beta"):
        gvpo.gvpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), beta=True)
    with pytest.raises(TypeError, match="rewards"):
        gvpo.gvpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), [[0.0] * 3] * 2, beta=0.1)
    with pytest.raises(ValueError, match="logp_ref_tok"):
        z = torch.zeros(1, 2, 3)
        grpo.grpo_loss(z, z, torch.ones_like(z), torch.zeros(1, 2), kl_coef=0.1)
    with pytest.raises(ValueError, match="config.k"):
        RLConfig(k=1)
    with pytest.raises(ValueError, match="config.anchor"):
        RLConfig(anchor="frozen")
    with pytest.raises(ValueError, match="config.kl_coef"):
        RLConfig(loss="gvpo", kl_coef=0.1)  # GVPO has no k3 penalty: setting it is an error
    with pytest.raises(ValueError, match="config.anchor"):
        RLConfig(loss="grpo", anchor="old")
    with pytest.raises(ValueError, match="config.max_grad_norm"):
        RLConfig(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="config.max_grad_norm"):
        RLConfig(max_grad_norm=float("nan"))
    with pytest.raises(ValueError, match="config.prompts_per_step"):
        tabular.train_tabular(torch.zeros(2, 3), torch.zeros(2, 3), RLConfig(prompts_per_step=3))
    with pytest.raises(ValueError, match="config.minibatches"):
        RLConfig(prompts_per_step=6, minibatches=4)
    with pytest.raises(ValueError, match="config.gvpo_terms"):
        RLConfig(loss="grpo", gvpo_terms="variance")


@pytest.mark.parametrize("loss", ["gvpo", "grpo", "dr_grpo", "kl_pg"])
def test_train_smoke_changes_parameters(arith_model, loss):
    from refimpl import load_model
    from refimpl.worlds import arith

    ref, tok = arith_model
    policy, _ = load_model("refimpl/toy-arith", device="cpu")
    prompts, targets = arith.prompts("train")
    extra = {"kl_coef": 0.04} if loss == "grpo" else {}
    cfg = RLConfig(loss=loss, steps=2, k=2, prompts_per_step=4, lr=1e-3, max_new_tokens=arith.MAX_NEW_TOKENS, **extra)
    seen = []  # the callback sees every step, after its update
    log = rl.train(policy, ref, tok, prompts, targets, arith.reward, cfg,
                   callback=lambda step, pol: seen.append((step, next(pol.parameters()).detach().clone())))
    assert [s for s, _ in seen] == [1, 2] and torch.equal(seen[-1][1], next(policy.parameters()))
    assert not torch.equal(seen[0][1], next(ref.parameters()))  # step 1 had already updated the policy
    hist = log.as_dict()
    assert set(hist) >= {"reward/mean", "kl/ref", "grad/norm", "loss"}
    assert all(len(v) == 2 for v in hist.values())
    assert log.kl_ref[0] == pytest.approx(0.0, abs=1e-5)  # step 0 samples the unchanged policy
    changed = any(not torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters()))
    assert changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    logp, logp_anchor, rewards = _groups(dtype=torch.float32)
    cpu = gvpo.gvpo_loss(logp, logp_anchor, rewards, 0.1)
    (g_cpu,) = torch.autograd.grad(cpu, logp)
    logp_c = logp.detach().cuda().requires_grad_(True)
    cuda = gvpo.gvpo_loss(logp_c, logp_anchor.cuda(), rewards.cuda(), 0.1)
    (g_cuda,) = torch.autograd.grad(cuda, logp_c)
    torch.testing.assert_close(cuda.cpu(), cpu)
    torch.testing.assert_close(g_cuda.cpu(), g_cpu)
    z = torch.randn(2, 3, 4)
    m = torch.ones_like(z)
    r = torch.rand(2, 3)
    torch.testing.assert_close(grpo.grpo_loss(z.cuda(), z.cuda(), m.cuda(), r.cuda()).cpu(),
                               grpo.grpo_loss(z, z, m, r))


def test_table_ablations_and_reduction_match_the_functions():
    logp, anchor, R = _groups(P=4, k=5)
    tok = logp.unsqueeze(-1)
    one = lambda t: t.unsqueeze(-1)
    b = rl.GroupBatch(tok, one(anchor), one(anchor), one(anchor), torch.ones_like(tok), R, 1)
    for terms, cov, var in [("covariance", True, False), ("variance", False, True)]:
        got = rl.LOSSES["gvpo"].fn(b, RLConfig(beta=0.3, gvpo_terms=terms))
        torch.testing.assert_close(got, gvpo.gvpo_loss_terms(logp, anchor, R, 0.3, covariance=cov, variance=var))
    mean = rl.LOSSES["gvpo"].fn(b, RLConfig(beta=0.3))
    total = rl.LOSSES["gvpo"].fn(b, RLConfig(beta=0.3, gvpo_reduction="sum"))
    torch.testing.assert_close(total, 4 * mean)  # the authors' sum over groups = groups x the mean
    # both terms: the full loss minus the constant 1/2 Var(R), hence the same gradient
    both = gvpo.gvpo_loss_terms(logp, anchor, R, 0.3)
    torch.testing.assert_close(both + 0.5 * R.var(1).mean(), mean)


def test_mirror_descent_step_theorem():
    """GVPO anchored at the policy at the start of a period, trained to convergence within it,
    takes the step pi_next = pi_start exp(R/beta) / Z (a KL-regularized trust-region step)."""
    logp_ref, reward = _small_world(seed=4)
    beta, period = 0.5, 600
    cfg = RLConfig(beta=beta, anchor="old", k=8, steps=2 * period, lr=10.0)
    _, hist = tabular.train_tabular(logp_ref, reward, cfg, sampling="uniform", anchor_every=period)
    one = kl.optimal_policy(logp_ref, reward, beta)  # after one period
    two = kl.optimal_policy(one, reward, beta)  # = pi_ref exp(2R/beta)/Z after two
    assert kl.kl_divergence(hist[period - 1], one).max() < 1e-6
    assert kl.kl_divergence(hist[-1], two).max() < 1e-6
    assert kl.kl_divergence(two, one).min() > 1e-2  # the two targets really differ


@pytest.mark.parametrize("kw", [dict(minibatches=2), dict(staleness=1), dict(replay=1, minibatches=2)])
def test_train_rollout_variants(arith_model, kw):
    from refimpl import load_model
    from refimpl.worlds import arith

    ref, tok = arith_model
    prompts, targets = arith.prompts("train")
    for loss, extra in [("gvpo", dict(anchor="old")), ("grpo", {})]:
        policy, _ = load_model("refimpl/toy-arith", device="cpu")
        cfg = RLConfig(loss=loss, steps=3, k=2, prompts_per_step=4, lr=1e-2, max_new_tokens=arith.MAX_NEW_TOKENS, **extra, **kw)
        log = rl.train(policy, ref, tok, prompts, targets, arith.reward, cfg)
        assert all(len(v) == 3 for v in log.as_dict().values())
        if kw.get("minibatches", 1) > 1 or kw.get("staleness"):
            assert max(log.clip_frac) > 0  # the second update (or stale data) moves the ratio off 1
        if kw.get("staleness"):
            assert log.grad_norm[0] == 0.0  # step 0 has no rollout old enough to train on


def test_rollout_batch_gvpo_old_is_dr_grpo_up_to_scale(arith_model):
    """On a fresh rollout (rho = 0 at the old anchor, ratios = 1) GVPO-old's gradient is Dr. GRPO's
    times beta·k·T_max/(k-1): both are centred-reward policy gradient with token sums."""
    from refimpl.worlds import arith

    ref, tok = arith_model
    policy = copy.deepcopy(ref)
    prompts, targets = arith.prompts("train")
    cfg = RLConfig(k=4, prompts_per_step=6, max_new_tokens=arith.MAX_NEW_TOKENS)
    b = rl.rollout_batch(policy, ref, tok, prompts, targets, arith.reward, cfg, seed=3)
    assert b.logp_tok.shape == (6, 4, b.mask.shape[-1]) and b.logp_tok.requires_grad
    assert b.rewards.shape == (6, 4) and b.rewards.std() > 0  # some signal in this rollout
    params = list(policy.parameters())
    flat = lambda loss: torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
    g_old = flat(rl.LOSSES["gvpo"].fn(b, RLConfig(beta=0.1, anchor="old")))
    g_dr = flat(rl.LOSSES["dr_grpo"].fn(b, RLConfig(loss="dr_grpo")))
    torch.testing.assert_close(g_old, 0.1 * 4 * arith.MAX_NEW_TOKENS / 3 * g_dr, rtol=1e-4, atol=1e-7)
    with pytest.raises(TypeError, match="config"):
        rl.rollout_batch(policy, ref, tok, prompts, targets, arith.reward, config={"k": 4})
    with pytest.raises(ValueError, match="prompts_per_step"):
        rl.rollout_batch(policy, ref, tok, prompts[:3], targets[:3], arith.reward, cfg)


# --- GVPO-reference = KL-PG; reward-KL paths against the frontier ----------------------------------

def test_gvpo_reference_is_beta_times_kl_pg_on_any_batch():
    """Per batch, per token, any sampler: ∇ GVPO(reference anchor) = beta·∇ KL-PG (k1 in the reward, RLOO)."""
    g = torch.Generator().manual_seed(5)
    tok = torch.randn(3, 4, 2, dtype=torch.float64, generator=g).requires_grad_()
    ref_tok, beh = torch.randn(3, 4, 2, dtype=torch.float64, generator=g), torch.randn(3, 4, 2, dtype=torch.float64)
    b = rl.GroupBatch(tok, beh, beh, ref_tok, torch.ones_like(ref_tok), torch.rand(3, 4, dtype=torch.float64), 2)
    for beta in (0.1, 0.7):
        g_gvpo = torch.autograd.grad(rl.LOSSES["gvpo"].fn(b, RLConfig(beta=beta)), tok)[0]
        g_pg = torch.autograd.grad(rl.LOSSES["kl_pg"].fn(b, RLConfig(loss="kl_pg", beta=beta)), tok)[0]
        torch.testing.assert_close(g_gvpo, beta * g_pg, rtol=0, atol=1e-14)


@pytest.mark.parametrize("sampling", ["uniform", "reference", "policy"])
def test_kl_pg_is_gvpo_reference_at_beta_times_the_step(sampling):
    logp_ref, reward = _small_world()
    beta = 0.5
    star = kl.optimal_policy(logp_ref, reward, beta)
    a = tabular.train_tabular(logp_ref, reward, RLConfig(beta=beta, k=8, steps=600, lr=10.0), sampling=sampling)
    b = tabular.train_tabular(logp_ref, reward, RLConfig(loss="kl_pg", beta=beta, k=8, steps=600, lr=10.0 * beta),
                              sampling=sampling)
    assert max((x - y).abs().max().item() for x, y in zip(a.history, b.history)) < 1e-10  # one trajectory
    assert kl.kl_divergence(b.logp, star).max().item() < 1e-10  # pi*, from any full-support sampler
    if sampling != "policy":  # without a baseline, off-policy KL-PG goes elsewhere
        c = tabular.train_tabular(logp_ref, reward, RLConfig(loss="kl_pg", beta=beta, k=8, steps=600, lr=10.0 * beta,
                                                             kl_baseline="none"), sampling=sampling)
        assert kl.kl_divergence(c.logp, star).mean().item() > 0.05


def test_mirror_steps_lie_on_the_frontier():
    logp_ref, reward = _small_world()
    for beta, step_beta in ((0.1, 1.0), (0.0, 0.5)):
        m = frontier.mirror_path(logp_ref, reward, beta, step_beta, 30)
        for t in (1, 7, 30):  # every iterate is pi* of beta' = 1/c_t
            torch.testing.assert_close(m.logp[t], kl.optimal_policy(logp_ref, reward, 1 / m.inverse_beta[t].item()),
                                       rtol=0, atol=1e-12)
        pts = frontier.reward_kl(m.logp, logp_ref, reward)
        torch.testing.assert_close(pts.kl, frontier.frontier_kl(logp_ref, reward, pts.reward), rtol=1e-9, atol=1e-12)
        assert (pts.reward.diff() > 0).all()
    torch.testing.assert_close(m.inverse_beta[:4], torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64))  # t/beta_s
    m = frontier.mirror_path(logp_ref, reward, 0.1, 1.0, 400)  # c_t - 1/beta shrinks by 1/1.1 per step
    torch.testing.assert_close(m.logp[-1], kl.optimal_policy(logp_ref, reward, 0.1), rtol=0, atol=1e-9)  # c -> 1/beta
    f = frontier.frontier(logp_ref, reward, [1.0, 0.1])
    torch.testing.assert_close(frontier.frontier_kl(logp_ref, reward, f.reward), f.kl, rtol=1e-9, atol=1e-12)
    base = frontier.reward_kl([logp_ref], logp_ref, reward).reward
    assert frontier.frontier_kl(logp_ref, reward, base - 0.1).item() == 0.0


def test_gradient_ascent_leaves_the_frontier():
    """Noiseless gradient ascent on J_beta spends more KL than the frontier at the same reward; the expected
    path is exact gradient ascent with step lr·beta, and the sampled path follows it."""
    logp_ref, reward = _small_world()
    beta, lr = 0.1, 5.0
    run = frontier.expected_path(logp_ref, reward, beta, lr, 400)
    t = logp_ref.clone().requires_grad_(True)
    J = kl.regularized_objective(torch.log_softmax(t, -1), logp_ref, reward, beta).sum()
    step = torch.log_softmax(logp_ref + lr * beta * torch.autograd.grad(J, t)[0], -1)
    torch.testing.assert_close(run.history[0], step, rtol=0, atol=1e-14)
    pts = frontier.reward_kl(run.history, logp_ref, reward)
    ratio = pts.kl / frontier.frontier_kl(logp_ref, reward, pts.reward)
    assert (ratio > 1 - 1e-9).all() and ratio.max().item() > 1.1
    assert kl.kl_divergence(run.logp, kl.optimal_policy(logp_ref, reward, beta)).max().item() < 0.1
    # GVPO-old with m exact inner steps: each period ends near a mirror step
    m = frontier.expected_path(logp_ref, reward, 0.5, 10.0, 2 * 300, sampling="uniform", anchor="old", anchor_every=300)
    one = kl.optimal_policy(logp_ref, reward, 0.5)
    assert kl.kl_divergence(m.history[299], one).max().item() < 1e-8
    with pytest.raises(ValueError, match="sampling"):
        frontier.expected_path(logp_ref, reward, beta, lr, 2, sampling="mixture")
    with pytest.raises(ValueError, match="path"):
        frontier.reward_kl(torch.zeros(2, 3, 5, dtype=torch.float64), logp_ref, reward)
    with pytest.raises(ValueError, match="betas"):
        frontier.frontier(logp_ref, reward, [0.0])
    with pytest.raises(ValueError, match="step_beta"):
        frontier.mirror_path(logp_ref, reward, 0.1, 0.0, 3)


def test_kl_pg_trains_off_policy_on_a_language_model(arith_model):
    from refimpl import load_model
    from refimpl.worlds import arith

    ref, tok = arith_model
    prompts, targets = arith.prompts("train")
    policy, _ = load_model("refimpl/toy-arith", device="cpu")
    cfg = RLConfig(loss="kl_pg", steps=2, k=2, prompts_per_step=4, minibatches=2, staleness=1, lr=1e-2,
                   kl_estimator="k3_corrected_loss", kl_level="token", max_new_tokens=arith.MAX_NEW_TOKENS)
    log = rl.train(policy, ref, tok, prompts, targets, arith.reward, cfg)
    assert log.grad_norm[0] == 0.0 and log.grad_norm[1] > 0  # step 0 has no stale rollout yet
