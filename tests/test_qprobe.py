"""refimpl.qprobe: losses vs analytic gradients, selection vs its expectation, limits, training,
validation, the model pipeline, and CPU/CUDA agreement."""
import math

import pytest
import torch

from refimpl import pools, qprobe, resample
from refimpl.metrics import pass_at_k


def _qr(shape=(5, 7), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape, generator=g, dtype=dtype)
    r = (torch.rand(shape, generator=g, dtype=dtype) < 0.4).to(dtype)
    return q, r


def test_pg_loss_gradient_matches_analytic():
    q, r = _qr()
    P = q.shape[0]
    for beta in (0.1, 1.0, 3.0):
        q_ = q.clone().requires_grad_(True)
        qprobe.pg_loss(q_, r, beta).backward()
        p = torch.softmax(q / beta, -1)
        baseline = (p * r).sum(-1, keepdim=True)
        analytic = -(1 / beta) * p * (r - baseline) / P  # dL/dQ_i
        torch.testing.assert_close(q_.grad, analytic)


def test_pg_loss_is_invariant_to_a_constant_reward_shift_in_gradient():
    q, r = _qr(seed=1)
    grads = []
    for c in (0.0, 5.0):
        q_ = q.clone().requires_grad_(True)
        qprobe.pg_loss(q_, r + c, 0.5).backward()
        grads.append(q_.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_expected_reward_matches_mean_of_select_draws():
    q, r = _qr((4, 6), seed=2)
    beta = 0.7
    g = torch.Generator().manual_seed(0)
    n = 40000
    idx = resample.select(q.expand(n, 4, 6), beta, generator=g)  # [n, 4]
    drawn = r.gather(1, idx.T).mean(1)  # [4] mean reward of the chosen candidates
    exact = resample.expected_value(q, r, beta)
    # Bernoulli rewards: the standard error is at most 0.5 / sqrt(n) = 0.0025.
    assert (drawn - exact).abs().max() < 5 * 0.5 / math.sqrt(n)


def test_beta_zero_is_argmax_with_first_index_ties_and_the_limit_of_small_beta():
    q = torch.tensor([[0.1, 0.9, 0.9, -1.0], [2.0, 0.0, 2.0, 1.0]])
    w = resample.selection_weights(q, 0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))
    torch.testing.assert_close(resample.select(q, 0.0), torch.tensor([1, 0]))
    q2, r = _qr((6, 9), seed=3)
    torch.testing.assert_close(resample.selection_weights(q2, 1e-4), resample.selection_weights(q2, 0))
    torch.testing.assert_close(resample.expected_value(q2, r, 1e-4), resample.expected_value(q2, r, 0))
    # beta -> infinity: uniform choice, expected reward = mean reward.
    torch.testing.assert_close(resample.expected_value(q2, r, 1e6), r.mean(-1), atol=1e-5, rtol=0)


def test_bt_and_reward_modelling_losses():
    qc, qr = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    expected = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.sigmoid(torch.tensor(-2.0)))) / 2
    torch.testing.assert_close(qprobe.bt_loss(qc, qr), expected)
    q, r = _qr(seed=4)
    torch.testing.assert_close(qprobe.mse_loss(q, r), ((q - r) ** 2).mean())
    bce = -(r * torch.log(torch.sigmoid(q)) + (1 - r) * torch.log(1 - torch.sigmoid(q))).mean()
    torch.testing.assert_close(qprobe.ce_loss(q, r), bce)


def _linear_world(P=40, n=40, d=8, seed=0):
    """Features whose first coordinate is the (binary) reward, plus noise."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(P, n, generator=g) < 0.3).float()
    f = torch.randn(P, n, d, generator=g)
    f[..., 0] = 2 * r - 1 + 0.1 * torch.randn(P, n, generator=g)
    return f, r


@pytest.mark.parametrize("loss", ["mse", "ce", "pg"])
def test_probe_recovers_a_linearly_encoded_reward(loss):
    f, r = _linear_world()
    probe, curve = qprobe.train_probe(f, r, loss=loss, beta=1.0, chunk_size=10, epochs=60, lr=3e-2, seed=0)
    assert curve[-1] < curve[0]  # training decreased the loss
    ft, rt = _linear_world(seed=1)
    with torch.no_grad():
        q = probe(ft)
    picked = qprobe.chunk_expected_reward(q, rt, 20, 0.0).mean()
    assert picked > 0.95  # argmax over 20 candidates finds a correct one (pass@20 ~ 0.999)
    w = probe.net.weight.detach()[0]
    assert w[0].abs() > 3 * w[1:].abs().max()  # the weight sits on the reward coordinate


def test_bt_training_orders_pairs():
    f, r = _linear_world(P=200, n=2, seed=2)
    keep = r[:, 0] != r[:, 1]
    probe, curve = qprobe.train_probe(f[keep], r[keep], loss="bt", epochs=100, lr=3e-2)
    ft, rt = _linear_world(P=200, n=2, seed=3)
    keep = rt[:, 0] != rt[:, 1]
    with torch.no_grad():
        q = probe(ft[keep])
    assert ((q[:, 1] > q[:, 0]) == (rt[keep][:, 1] > rt[keep][:, 0])).float().mean() > 0.95


def test_training_is_seeded_and_mlp_probe_works():
    f, r = _linear_world(P=10, n=20)
    a, ca = qprobe.train_probe(f, r, loss="pg", chunk_size=5, epochs=3, seed=7)
    b, cb = qprobe.train_probe(f, r, loss="pg", chunk_size=5, epochs=3, seed=7)
    assert ca == cb
    torch.testing.assert_close(a(f), b(f))
    mlp, _ = qprobe.train_probe(f, r, loss="ce", epochs=2, hidden=(16,))
    assert mlp(f).shape == (10, 20)


def test_chunk_expected_reward_and_pass_at_k():
    q, r = _qr((3, 12), seed=5)
    by_hand = torch.stack([resample.expected_value(q[:, i : i + 4], r[:, i : i + 4], 0.3) for i in (0, 4, 8)], -1)
    torch.testing.assert_close(qprobe.chunk_expected_reward(q, r, 4, 0.3), by_hand.mean(-1))
    # k = 1 with any beta is the mean reward.
    torch.testing.assert_close(qprobe.chunk_expected_reward(q, r, 1, 0.0), r.mean(-1))
    n, c = 10, torch.tensor([0, 3, 10])
    brute = [1 - math.comb(n - ci, 4) / math.comb(n, 4) for ci in c.tolist()]
    torch.testing.assert_close(pass_at_k(c, n, 4), torch.tensor(brute, dtype=torch.float64))
    torch.testing.assert_close(pass_at_k(c, n, 1), c / n, check_dtype=False)


def test_validation_errors_name_the_argument():
    q, r = _qr()
    with pytest.raises(ValueError, match="beta"):
        resample.selection_weights(q, -0.1)
    with pytest.raises(TypeError, match="beta"):
        resample.selection_weights(q, "0.1")
    with pytest.raises(ValueError, match="beta"):
        qprobe.pg_loss(q, r, 0.0)
    with pytest.raises(ValueError, match="values"):
        resample.expected_value(q, r[:, :3], 0.1)
    with pytest.raises(ValueError, match="scores"):
        resample.selection_weights(torch.tensor(1.0), 0.1)
    with pytest.raises(TypeError, match="scores"):
        resample.selection_weights(torch.tensor([1, 2]), 0.1)
    f, r2 = _linear_world(P=4, n=6)
    with pytest.raises(ValueError, match="chunk_size"):
        qprobe.train_probe(f, r2, chunk_size=1)
    with pytest.raises(ValueError, match="chunk_size"):
        qprobe.train_probe(f, r2, chunk_size=7)
    with pytest.raises(ValueError, match="features"):
        qprobe.train_probe(f[0], r2)
    with pytest.raises(ValueError, match="rewards"):
        qprobe.train_probe(f, r2[:, :3])
    with pytest.raises(ValueError, match="loss"):
        qprobe.train_probe(f, r2, loss="nope")
    with pytest.raises(ValueError, match="k"):
        pass_at_k(torch.tensor([1]), 3, 4)
    with pytest.raises(ValueError, match="k"):
        qprobe.chunk_expected_reward(q, r, 0, 0.1)


def test_collect_shapes_and_embedding_matches_text_embedding(arith_model):
    from refimpl.worlds import arith

    model, tok = arith_model
    xs, ts = arith.prompts("train")
    pool = pools.collect(model, tok, xs[:3], ts[:3], arith.reward, k=4, seed=0)
    f, r, texts = pool.features, pool.rewards, pool.texts
    assert f.shape == (3, 4, model.config.n_embd) and r.shape == (3, 4) and len(texts) == 12
    torch.testing.assert_close(r.reshape(-1), arith.reward(texts, [t for t in ts[:3] for _ in range(4)]))
    # Re-tokenizing the texts (the "API" path) reproduces the sampler's own features when every
    # completion ended at the stop token.
    again = pools.embed_texts(model, tok, [x for x in xs[:3] for _ in range(4)],
                               [y + " " + arith.STOP for y in texts]).reshape(3, 4, -1)
    stopped = torch.tensor([y.count(" ") < 4 for y in texts]).reshape(3, 4)
    torch.testing.assert_close(again[stopped], f[stopped], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    q, r = _qr((8, 16), seed=6, dtype=torch.float32)
    for beta in (0.0, 0.1, 1.0):
        torch.testing.assert_close(resample.expected_value(q.cuda(), r.cuda(), beta).cpu(),
                                   resample.expected_value(q, r, beta))
    q_ = q.cuda().requires_grad_(True)
    qprobe.pg_loss(q_, r.cuda(), 0.5).backward()
    qc = q.clone().requires_grad_(True)
    qprobe.pg_loss(qc, r, 0.5).backward()
    torch.testing.assert_close(q_.grad.cpu(), qc.grad)
    f, r2 = _linear_world(P=20, n=20)
    a, ca = qprobe.train_probe(f, r2, loss="pg", chunk_size=5, epochs=5, seed=0, device="cpu")
    b, cb = qprobe.train_probe(f.cuda(), r2.cuda(), loss="pg", chunk_size=5, epochs=5, seed=0, device="cuda")
    # Shuffles are drawn on the CPU, so both devices see the same batches.
    assert abs(ca[-1] - cb[-1]) < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(b(f.cuda()).cpu(), a(f), atol=1e-4, rtol=1e-4)


def test_sampler_law_against_enumeration():
    """P_k by Monte Carlo equals the exact law from enumerating all N^k candidate tuples."""
    import itertools

    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, generator=g, dtype=torch.float64), -1)
    q = torch.randn(4, generator=g, dtype=torch.float64)
    beta, k = 0.5, 3
    exact = torch.zeros(4, dtype=torch.float64)
    for tup in itertools.product(range(4), repeat=k):
        idx = torch.tensor(tup)
        prob = logp[idx].sum().exp()
        exact.scatter_add_(0, idx, prob * resample.selection_weights(q[idx], beta))
    est = resample.resampling_law(logp, q / beta, [1, k], n_mc=50000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est[0], logp)  # k = 1 returns the base model
    assert (est[1].exp() - exact).abs().max() < 5e-3
    with pytest.raises(ValueError, match="ks"):
        resample.resampling_law(logp, q / beta, [0])


@pytest.mark.parametrize("loss, hidden", [("pg", ()), ("mse", ()), ("ce", (8,)), ("bt", ())])
def test_train_probes_equals_one_probe_per_feature_set(loss, hidden):
    """train_probes on S feature sets = train_probe on each (same init, same batches), to float rounding."""
    g = torch.Generator().manual_seed(0)
    n = 2 if loss == "bt" else 12
    f = torch.randn(3, 20, n, 6, generator=g)  # S = 3 feature sets
    r = torch.rand(20, n, generator=g) if loss != "ce" else (torch.rand(20, n, generator=g) < 0.4).float()
    if loss == "bt":
        r = torch.stack([r[:, 0], 1 - r[:, 0]], 1).round()
        r[r[:, 0] == r[:, 1], 0] = 1.0
        r[:, 1] = 1 - r[:, 0]
    kw = dict(loss=loss, chunk_size=4, epochs=5, lr=3e-2, weight_decay=0.01, batch_size=40, hidden=hidden, seed=3)
    fits = qprobe.train_probes(f, r, **kw)
    assert len(fits) == 3
    for s, fit in enumerate(fits):
        one = qprobe.train_probe(f[s], r, **kw)
        a, b = fit.probe(f[s]), one.probe(f[s])
        if loss in ("pg", "bt"):  # their loss does not see a shift of Q: the bias has no gradient, only noise
            a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert fit.curve == pytest.approx(one.curve, rel=1e-4, abs=1e-6)
    assert not torch.allclose(fits[0].probe(f[0]), fits[1].probe(f[0]))  # different features, different probes
