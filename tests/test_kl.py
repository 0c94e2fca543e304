"""refimpl.kl: the Gibbs optimum against brute force, identities, stability, validation."""
import math

import pytest
import torch

from refimpl import kl


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, -1)
    reward = torch.rand(shape, generator=g, dtype=torch.float64)
    return logp_ref, reward


def test_optimal_policy_is_normalized_and_matches_closed_form():
    logp_ref, r = _rand((3, 7))
    beta = 0.3
    logp = kl.optimal_policy(logp_ref, r, beta)
    p = logp_ref.exp() * torch.exp(r / beta)
    torch.testing.assert_close(logp.exp(), p / p.sum(-1, keepdim=True))
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(3, dtype=torch.float64))


def test_value_at_optimum_is_beta_log_z():
    logp_ref, r = _rand((4, 11), seed=1)
    for beta in (0.05, 0.5, 5.0):
        J = kl.regularized_objective(kl.optimal_policy(logp_ref, r, beta), logp_ref, r, beta)
        torch.testing.assert_close(J, beta * kl.log_partition(logp_ref, r, beta))


def test_optimum_beats_numerical_optimization_and_gradient_vanishes():
    logp_ref, r = _rand((9,), seed=2)
    beta = 0.2
    theta = torch.zeros(9, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -kl.regularized_objective(torch.log_softmax(theta, -1), logp_ref, r, beta)
        loss.backward()
        return loss

    opt.step(closure)
    logp_star = kl.optimal_policy(logp_ref, r, beta)
    assert kl.kl_divergence(torch.log_softmax(theta.detach(), -1), logp_star) < 1e-9
    # Stationarity: the gradient of J in logits vanishes at pi*.
    theta_star = logp_star.clone().requires_grad_(True)
    kl.regularized_objective(torch.log_softmax(theta_star, -1), logp_ref, r, beta).backward()
    assert theta_star.grad.abs().max() < 1e-10


def test_gibbs_gap_identity():
    """J(pi*) - J(p) = beta KL(p || pi*) for every p."""
    logp_ref, r = _rand((5, 6), seed=3)
    logp, _ = _rand((5, 6), seed=4)
    beta = 0.7
    star = kl.optimal_policy(logp_ref, r, beta)
    gap = kl.regularized_objective(star, logp_ref, r, beta) - kl.regularized_objective(logp, logp_ref, r, beta)
    torch.testing.assert_close(gap, beta * kl.kl_divergence(logp, star))


def test_kl_conventions():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    logq = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    assert torch.isclose(kl.kl_divergence(logp, logq), torch.tensor(math.log(2.0)))
    assert kl.kl_divergence(logq, logp) == float("inf")  # q puts mass where p has none
    assert kl.kl_divergence(logp, logp) == 0.0
    assert torch.isclose(kl.total_variation(logp, logq), torch.tensor(0.5))


def test_stable_for_large_reward_over_beta():
    logp_ref, r = _rand((2, 5), seed=5)
    logp = kl.optimal_policy(logp_ref, r * 1e4, 1e-3)
    assert torch.isfinite(logp).all()
    assert torch.isfinite(kl.log_partition(logp_ref.float(), (r * 1e4).float(), 1e-3)).all()
    assert (logp.exp().argmax(-1) == r.argmax(-1)).all()  # beta -> 0 puts all mass on the argmax


def test_zero_support_stays_zero():
    logp_ref = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    logp = kl.optimal_policy(logp_ref, torch.tensor([0.0, 1.0, 10.0]), 1.0)
    assert logp[2] == float("-inf")
    assert torch.isfinite(kl.regularized_objective(logp, logp_ref, torch.tensor([0.0, 1.0, 10.0]), 1.0))


def test_gradients_flow():
    logp_ref, r = _rand((3, 4), seed=6)
    theta = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    kl.regularized_objective(torch.log_softmax(theta, -1), logp_ref, r, 0.5).sum().backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta(beta):
    logp_ref, r = _rand((4,))
    with pytest.raises(ValueError, match="beta"):
        kl.optimal_policy(logp_ref, r, beta)


def test_bad_shapes_and_types():
    logp_ref, r = _rand((4,))
    with pytest.raises(ValueError, match="reward"):
        kl.log_partition(logp_ref, r[:3], 1.0)
    with pytest.raises(TypeError, match="logq"):
        kl.kl_divergence(logp_ref, [0.1, 0.2])
    with pytest.raises(TypeError, match="beta"):
        kl.optimal_policy(logp_ref, r, "1")
    with pytest.raises(TypeError, match="reward"):
        kl.optimal_policy(logp_ref, torch.ones(4, dtype=torch.long), 1.0)


def test_leading_dimensions_broadcast():
    logp_ref, r = _rand((3, 5), seed=7)
    many, _ = _rand((10, 3, 5), seed=8)
    batched = kl.regularized_objective(many, logp_ref, r, 0.4)
    looped = torch.stack([kl.regularized_objective(m, logp_ref, r, 0.4) for m in many])
    torch.testing.assert_close(batched, looped)
    with pytest.raises(ValueError, match="support"):
        kl.kl_divergence(many, logp_ref[:, :4])
