"""GVPO's log-ratio as a token mean: where it stops (gvpo.token_mean_optimum), the loss option
(RLConfig.gvpo_rho) and the exact world's completion lengths (tabular.train_tabular(lengths=))."""
import pytest
import torch

from refimpl import gvpo, kl, tabular
from refimpl.losses import LOSSES, GroupBatch
from refimpl.rl import RLConfig


def world(P=3, N=5, max_len=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.randn(P, N, generator=g, dtype=torch.float64).log_softmax(-1)
    reward = torch.rand(P, N, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, max_len + 1, (P, N), generator=g)
    return logp_ref, reward, lengths


def test_token_mean_optimum_is_pi_star_at_length_one_and_at_beta_over_L_for_equal_lengths():
    logp_ref, reward, _ = world()
    ones = torch.ones_like(reward, dtype=torch.long)
    torch.testing.assert_close(gvpo.token_mean_optimum(logp_ref, reward, ones, 0.7),
                               kl.optimal_policy(logp_ref, reward, 0.7), atol=1e-12, rtol=0)
    torch.testing.assert_close(gvpo.token_mean_optimum(logp_ref, reward, 3 * ones, 0.7),
                               kl.optimal_policy(logp_ref, reward, 0.7 / 3), atol=1e-12, rtol=0)


def test_token_mean_optimum_zeroes_the_residual_and_differs_from_pi_star():
    logp_ref, reward, lengths = world(max_len=6)
    beta = 0.5
    tm = gvpo.token_mean_optimum(logp_ref, reward, lengths, beta)
    torch.testing.assert_close(tm.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    residual = beta * (tm - logp_ref) / lengths - reward  # the same for every completion of a prompt
    assert (residual.amax(-1) - residual.amin(-1)).max() < 1e-10
    assert kl.kl_divergence(tm, kl.optimal_policy(logp_ref, reward, beta)).min() > 1e-3


def test_token_mean_loss_is_the_sum_loss_at_beta_over_L_when_lengths_are_equal():
    g = torch.Generator().manual_seed(1)
    P, k, T, L = 2, 4, 5, 3
    mask = torch.zeros(P, k, T, dtype=torch.float64)
    mask[..., :L] = 1
    logp = torch.randn(P, k, T, generator=g, dtype=torch.float64) * mask
    ref = torch.randn(P, k, T, generator=g, dtype=torch.float64) * mask
    batch = GroupBatch(logp, logp, logp, ref, mask, torch.rand(P, k, generator=g, dtype=torch.float64), max_tokens=T)
    mean = LOSSES["gvpo"].fn(batch, RLConfig(beta=0.6, gvpo_rho="token_mean"))
    summed = LOSSES["gvpo"].fn(batch, RLConfig(beta=0.6 / L))
    torch.testing.assert_close(mean, summed, atol=1e-12, rtol=0)
    assert not torch.allclose(mean, LOSSES["gvpo"].fn(batch, RLConfig(beta=0.6)))


def test_train_tabular_lengths_default_is_unchanged_and_sum_ignores_lengths():
    logp_ref, reward, lengths = world()
    cfg = RLConfig(beta=1.0, k=4, steps=20, lr=2.0)
    plain = tabular.train_tabular(logp_ref, reward, cfg, sampling="uniform").logp
    ones = tabular.train_tabular(logp_ref, reward, cfg, sampling="uniform", lengths=torch.ones_like(lengths)).logp
    assert torch.equal(plain, ones)
    spread = tabular.train_tabular(logp_ref, reward, cfg, sampling="uniform", lengths=lengths).logp
    torch.testing.assert_close(spread, plain, atol=1e-12, rtol=0)  # a sum over tokens is the completion's log-prob


def test_token_mean_training_converges_to_its_own_fixed_point_not_pi_star():
    logp_ref, reward, lengths = world()
    beta = 1.0
    run = tabular.train_tabular(logp_ref, reward, RLConfig(beta=beta, k=8, steps=4000, lr=5.0, gvpo_rho="token_mean"),
                                sampling="uniform", lengths=lengths)
    tm = gvpo.token_mean_optimum(logp_ref, reward, lengths, beta)
    assert (run.logp - tm).abs().max() < 1e-9
    assert (run.logp - kl.optimal_policy(logp_ref, reward, beta)).abs().max() > 1e-2


@pytest.mark.parametrize("bad, err, match", [
    (lambda L: L.double(), TypeError, "lengths"),
    (lambda L: L - 1, ValueError, "lengths"),
    (lambda L: L[:, :2], ValueError, "lengths"),
])
def test_lengths_are_checked(bad, err, match):
    logp_ref, reward, lengths = world()
    with pytest.raises(err, match=match):
        gvpo.token_mean_optimum(logp_ref, reward, bad(lengths), 1.0)
    with pytest.raises(err, match=match):
        tabular.train_tabular(logp_ref, reward, RLConfig(k=2, steps=1), lengths=bad(lengths))


def test_gvpo_rho_is_checked():
    with pytest.raises(ValueError, match="gvpo_rho"):
        RLConfig(gvpo_rho="mean")
    with pytest.raises(ValueError, match="gvpo_rho"):
        RLConfig(loss="grpo", gvpo_rho="token_mean")
    with pytest.raises(ValueError, match="beta"):
        gvpo.token_mean_optimum(*world(), 0.0)


def test_token_mean_optimum_normalises_pi_ref_and_refuses_an_empty_row():
    logp_ref, reward, lengths = world()
    torch.testing.assert_close(gvpo.token_mean_optimum(logp_ref + 3.0, reward, lengths, 1.0),
                               gvpo.token_mean_optimum(logp_ref, reward, lengths, 1.0), atol=1e-12, rtol=0)
    logp_ref[1] = float("-inf")
    with pytest.raises(ValueError, match="logp_ref"):
        gvpo.token_mean_optimum(logp_ref, reward, lengths, 1.0)
