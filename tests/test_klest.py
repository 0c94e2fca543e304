"""refimpl.klest: the per-token KL penalties against hand formulas and TRL's and verl's code, which KL's
gradient each follows (autograd over every sequence of a small world), and where exact training stops."""
import math

import pytest
import torch

from refimpl import kl, klest, klpg, rl
from refimpl.rl import RLConfig

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_penalties_by_hand_and_as_trl_and_verl_code_them():
    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(5, generator=g, dtype=D)).requires_grad_(True)
    ref = -3 * torch.rand(5, generator=g, dtype=D)
    t = ref - logp.detach()
    torch.testing.assert_close(klest.kl_penalty(logp, ref, "k1"), -t)
    torch.testing.assert_close(klest.kl_penalty(logp, ref, "k2"), 0.5 * t**2)
    k3 = klest.kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(k3, t.exp() - t - 1)
    # TRL 1.16 GRPOTrainer: per_token_kl = exp(ref - logp) - (ref - logp) - 1, times coef_1 = exp(logp - old) when
    # use_bias_correction_kl (old = logp.detach() on-policy): the same value, another gradient
    trl = (torch.exp(ref - logp) - (ref - logp) - 1) * torch.exp(logp - logp.detach())
    ours = klest.kl_penalty(logp, ref, "k3_corrected")
    torch.testing.assert_close(ours, trl)
    grad = lambda y: torch.autograd.grad(y.sum(), logp, retain_graph=True)[0]  # noqa: E731
    torch.testing.assert_close(grad(ours), grad(trl))
    torch.testing.assert_close(grad(ours), grad(k3) + k3.detach())  # ∇k3 + k3·∇log pi
    old = logp.detach() - 0.3
    torch.testing.assert_close(klest.kl_penalty(logp, ref, "k3_corrected", logp_old=old), k3 * math.exp(0.3))
    # verl's low_var_kl: kl = clamp(ref - logp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10)
    far = torch.tensor([-30.0, -5.0, 0.0, 2.0, 30.0], dtype=D)
    kl_ = (-far).clamp(-20, 20)
    verl = (kl_.exp() - kl_ - 1).clamp(-10, 10)
    torch.testing.assert_close(klest.kl_penalty(far, torch.zeros_like(far), "low_var_kl"), verl)
    with pytest.raises(ValueError, match="penalty"):
        klest.kl_penalty(logp, ref, "k4")


def _policy(world, seed):
    return torch.randn(world.logp_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _kl_gradients(world, theta):
    """Autograd of the sequence KLs and of the per-position KLs with the prefix law frozen."""
    rows, _ = klest._paths(world)
    ref = klest.token_logp(world, world.logp_ref).sum(-1)

    def grad(f):
        t = theta.clone().requires_grad_(True)
        return torch.autograd.grad(f(t), t)[0]

    def frozen(t, forward):
        lp, lr = torch.log_softmax(t, -1), world.logp_ref  # [n_prefixes, V]
        per = kl.kl_divergence(lr, lp) if forward else kl.kl_divergence(lp, lr)  # [n_prefixes]
        lt = klest.token_logp(world, theta)  # the prefix law, held constant
        reach = torch.zeros(theta.shape[0], dtype=D).scatter_reduce_(
            0, rows.reshape(-1), torch.cat([torch.zeros_like(lt[:, :1]), lt.cumsum(-1)[:, :-1]], -1).exp().reshape(-1),
            "amax")
        return (reach * per).sum()

    seq = lambda t: klest.token_logp(world, t).sum(-1)  # noqa: E731
    return {"reverse": grad(lambda t: kl.kl_divergence(seq(t), ref)),
            "forward": grad(lambda t: kl.kl_divergence(ref, seq(t))),
            "token_reverse": grad(lambda t: frozen(t, False)),
            "token_forward": grad(lambda t: frozen(t, True))}


@pytest.mark.parametrize("vocab", [2, 3])
def test_which_kl_each_penalty_differentiates(vocab):
    world = klest.sequence_world(vocab, 3, seed=vocab)
    silent = world._replace(reward=torch.zeros_like(world.reward))  # r = 0: the penalty's gradient alone
    theta = _policy(world, 1)
    want = _kl_gradients(world, theta)
    zero = torch.zeros_like(theta)
    cases = {
        ("k1_reward", "sequence"): want["reverse"], ("k1_reward", "token"): want["reverse"],
        ("k1_loss", "sequence"): zero, ("k1_loss", "token"): zero,
        ("k2_loss", "sequence"): want["reverse"], ("k2_loss", "token"): want["token_reverse"],
        ("k3_corrected_loss", "sequence"): want["reverse"], ("k3_corrected_loss", "token"): want["token_reverse"],
        ("k3_loss", "sequence"): want["forward"], ("k3_loss", "token"): want["token_forward"],
        ("low_var_kl_loss", "token"): want["token_forward"],  # its clamps are inactive here
        ("k3_reward", "sequence"): want["reverse"] - want["forward"],
    }
    for (est, level), g in cases.items():
        got = klest.expected_gradient(silent, theta, 1.0, est, level)
        torch.testing.assert_close(got, g, rtol=0, atol=1e-12, msg=f"{est} at level {level}")
    # per token, the reverse KL's gradient is not the sequence's: the prefix term is missing
    assert (want["token_reverse"] - want["reverse"]).abs().max().item() > 1e-3
    # with the reward: k1 in the reward is -∇J
    t = theta.clone().requires_grad_(True)
    J = kl.regularized_objective(klest.token_logp(world, t).sum(-1), klest.token_logp(world, world.logp_ref).sum(-1),
                                 world.reward, 0.3)
    torch.testing.assert_close(klest.expected_gradient(world, theta, 0.3, "k1_reward"), -torch.autograd.grad(J, t)[0],
                               rtol=0, atol=1e-12)


def test_sampled_token_loss_is_unbiased_for_its_expected_gradient():
    world = klest.sequence_world(3, 3, seed=0)
    theta = _policy(world, 2)
    exact = klest.expected_gradient(world, theta, 0.5, "k3_corrected_loss", "token")
    ref_tok = klest.token_logp(world, world.logp_ref)  # [S, T]
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(20):
        t = theta.clone().requires_grad_(True)
        lt = klest.token_logp(world, t)
        idx = torch.multinomial(lt.detach().sum(-1).exp(), 4000, replacement=True, generator=g).view(1000, 4)
        loss = klest.penalized_pg_loss(lt[idx], ref_tok[idx], torch.ones_like(lt[idx]), world.reward[idx], 0.5,
                                       "k3_corrected_loss", "token", "rloo")
        grads.append(torch.autograd.grad(loss, t)[0])
    grads = torch.stack(grads)
    assert ((grads.mean(0) - exact).abs() <= 5 * grads.std(0) / 20**0.5 + 1e-12).all()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_fixed_points_of_each_coding(beta):
    world = klest.sequence_world(3, 3, seed=0)
    seq = lambda table: klest.token_logp(world, table).sum(-1)  # noqa: E731
    star = kl.optimal_policy(seq(world.logp_ref), world.reward, beta)
    points = {kind: klest.fixed_point(world, beta, kind) for kind in ("optimum", "reverse", "forward")}
    torch.testing.assert_close(seq(points["optimum"]), star, rtol=0, atol=1e-12)  # backward induction = pi*
    stationary = {"optimum": [("k1_reward", "sequence"), ("k1_reward", "token"), ("k2_loss", "sequence"),
                              ("k3_corrected_loss", "sequence")],
                  "reverse": [("k2_loss", "token"), ("k3_corrected_loss", "token")],
                  "forward": [("k3_loss", "token"), ("low_var_kl_loss", "token")]}
    for kind, usages in stationary.items():
        for est, level in usages:
            g = klest.expected_gradient(world, points[kind], beta, est, level)
            assert g.abs().max().item() < 1e-10, (kind, est, level)
    for kind in ("reverse", "forward"):  # per-token penalties as a loss stop away from pi*
        assert kl.kl_divergence(seq(points[kind]), star).item() > 1e-3
        assert klest.expected_gradient(world, points[kind], beta, "k1_reward").abs().max().item() > 1e-4
    assert klest.expected_gradient(world, points["optimum"], beta, "k2_loss", "token").abs().max().item() > 1e-4


def test_exact_ascent_reaches_the_fixed_points():
    world = klest.sequence_world(3, 3, seed=0)
    beta = 0.1
    seq = lambda table: klest.token_logp(world, table).sum(-1)  # noqa: E731
    star = seq(klest.fixed_point(world, beta))
    rev = seq(klest.fixed_point(world, beta, "reverse"))
    a = klest.ascent(world, beta, "k1_reward", "token", lr=1 / beta, steps=300)
    b = klest.ascent(world, beta, "k2_loss", "token", lr=1 / beta, steps=300)
    assert a.history.shape == (301, 27)
    torch.testing.assert_close(a.history[0], seq(world.logp_ref))
    assert kl.kl_divergence(a.history[-1], star).item() < 1e-3
    assert kl.kl_divergence(b.history[-1], rev).item() < 1e-3
    assert kl.kl_divergence(b.history[-1], star).item() > 0.5 * kl.kl_divergence(rev, star).item() > 1e-2
    assert kl.kl_divergence(a.history[-1], star) < kl.kl_divergence(a.history[50], star)


def test_loss_table_codes_per_token_penalties():
    g = torch.Generator().manual_seed(3)
    tok = torch.randn(2, 4, 3, dtype=D, generator=g).requires_grad_()
    ref_tok = torch.randn(2, 4, 3, dtype=D, generator=g)
    mask = torch.ones_like(ref_tok)
    mask[0, 1, 2] = 0.0  # one padded token
    rewards = torch.rand(2, 4, dtype=D, generator=g)
    grad = lambda loss: torch.autograd.grad(loss, tok)[0]  # noqa: E731
    for est in klpg.ESTIMATORS:  # sequence level: klpg's loss on masked sums
        want = klpg.kl_pg_loss((tok * mask).sum(-1), (ref_tok * mask).sum(-1), rewards, 0.3, est)
        torch.testing.assert_close(klest.penalized_pg_loss(tok, ref_tok, mask, rewards, 0.3, est, "sequence"), want)
    for est in klest.ESTIMATORS:
        b = rl.GroupBatch(tok * mask, tok.detach() * mask, tok.detach() * mask, ref_tok, mask, rewards, 3)
        got = rl.LOSSES["kl_pg"].fn(b, RLConfig(loss="kl_pg", beta=0.3, kl_estimator=est, kl_level="token"))
        want = klest.penalized_pg_loss(tok * mask, ref_tok, mask, rewards, 0.3, est, "token")
        torch.testing.assert_close(grad(got), grad(want))
    # k1 per token in the reward is k1 of the sequence
    torch.testing.assert_close(klest.penalized_pg_loss(tok, ref_tok, mask, rewards, 0.3, "k1_reward", "token"),
                               klest.penalized_pg_loss(tok, ref_tok, mask, rewards, 0.3, "k1_reward", "sequence"))
    with pytest.raises(ValueError, match="kl_level"):
        RLConfig(loss="kl_pg", kl_level="word")
    with pytest.raises(ValueError, match="kl_level"):
        RLConfig(loss="gvpo", kl_level="token")  # an option GVPO does not read


def test_bad_arguments_are_named():
    world = klest.sequence_world(2, 2)
    z = torch.zeros(2, 3, 4, dtype=D)
    r = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="estimator"):
        klest.penalized_pg_loss(z, z, torch.ones_like(z), r, 0.1, "k5_loss")
    with pytest.raises(ValueError, match="level"):
        klest.penalized_pg_loss(z, z, torch.ones_like(z), r, 0.1, "k1_loss", level="word")
    with pytest.raises(ValueError, match="rewards"):
        klest.penalized_pg_loss(z, z, torch.ones_like(z), r[:, :2], 0.1, "k1_loss")
    with pytest.raises(ValueError, match="mask"):
        klest.penalized_pg_loss(z, z, torch.full_like(z, 0.5), r, 0.1, "k1_loss")
    with pytest.raises(TypeError, match="world"):
        klest.fixed_point((world.logp_ref, world.reward), 0.1)
    with pytest.raises(ValueError, match="world.logp_ref"):
        klest.expected_gradient(world._replace(logp_ref=world.logp_ref[:2]), world.logp_ref, 0.1, "k1_loss")
    with pytest.raises(ValueError, match="logits"):
        klest.expected_gradient(world, world.logp_ref[:, :1], 0.1, "k1_loss")
    with pytest.raises(ValueError, match="kind"):
        klest.fixed_point(world, 0.1, "sideways")
    with pytest.raises(ValueError, match="beta"):
        klest.ascent(world, 0.0, "k1_reward")
    with pytest.raises(ValueError, match="vocab"):
        klest.sequence_world(1, 3)
