"""refimpl.idle: closed form, generate-level distribution, edge cases, sequence-level identities."""
import pytest
import torch

from refimpl import idle, lm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_processor_matches_closed_form(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 11, generator=g)).to(dtype)
    banned = [0, 3, 7]
    out = idle.IDLELogitsProcessor(banned)(None, logits)
    assert out.dtype == dtype
    p = torch.softmax(logits.float(), -1)
    allowed = torch.ones(11, dtype=torch.bool)
    allowed[banned] = False
    q = torch.where(allowed, p / p[:, allowed].sum(-1, keepdim=True), torch.zeros_like(p))  # closed form
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(out.float().exp(), q, atol=tol)
    assert torch.isneginf(out[:, banned]).all()
    # exact arithmetic identity: renormalization == softmax after -inf masking
    sup = logits.float().masked_fill(~allowed, float("-inf"))
    assert torch.allclose(idle.exclude_and_renormalize(logits, banned).exp(), torch.softmax(sup, -1), atol=tol)


def test_edge_cases():
    x = torch.randn(2, 5)
    assert torch.allclose(idle.exclude_and_renormalize(x, []), torch.log_softmax(x, -1))
    with pytest.raises(ValueError, match="banned_ids"):
        idle.exclude_and_renormalize(x, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="banned_ids"):
        idle.IDLELogitsProcessor([0, 1, 2, 3, 4])(None, x)
    with pytest.raises(ValueError, match="banned_ids"):
        idle.exclude_and_renormalize(x, [9])
    with pytest.raises(TypeError, match="banned_ids"):
        idle.IDLELogitsProcessor("abc")
    with pytest.raises(ValueError, match="no finite allowed token"):
        idle.exclude_and_renormalize(torch.tensor([[0.0, float("-inf")]]), [0])
    # finite fill after truncation samples a banned token; -inf fill gives NaN probabilities
    after_top_p = torch.tensor([[0.0, float("-inf"), float("-inf")]])  # only the banned token 0 survived
    assert torch.softmax(idle.NaiveMaskLogitsProcessor([0])(None, after_top_p), -1)[0, 0] == 1
    assert torch.isnan(torch.softmax(idle.NaiveMaskLogitsProcessor([0], float("-inf"))(None, after_top_p), -1)).all()


def test_generate_first_token_distribution(arith_model):
    """One generate step with [I-DLE] then top-p = renormalize, then truncate (TV bound)."""
    from transformers import TopPLogitsWarper

    model, tok = arith_model
    prompt, ban, top_p, n = ["4 7 + 8 5 ="], [tok.convert_tokens_to_ids(d) for d in "23"], 0.8, 4000
    s = lm.sample(model, tok, prompt, k=n, max_new_tokens=1, top_p=top_p,
                  logits_processor=[idle.IDLELogitsProcessor(ban)], seed=0)
    enc = tok(prompt, return_tensors="pt")
    logits = model(**enc).logits[:, -1].float()
    expected = torch.softmax(TopPLogitsWarper(top_p)(None, idle.exclude_and_renormalize(logits, ban)), -1)[0]
    emp = torch.bincount(s.completion_ids[:, 0], minlength=expected.numel()).float() / n
    assert emp[ban].sum() == 0
    assert 0.5 * (emp - expected).abs().sum() < 0.03  # sampling noise at n=4000 is ~0.01


def _exact(world, ban=(4,)):
    logp = world.logp().detach()
    log_q, log_w = idle.exact_token_level(logp, 5, list(ban))
    allowed = ~torch.isin(world.completion_ids, torch.tensor(ban)).any(-1)
    log_pa = torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), -1, keepdim=True)
    log_pstar = (logp - log_pa).masked_fill(~allowed, float("-inf"))
    return logp, log_q, log_w, allowed, log_pa, log_pstar


def test_importance_weights_exact_world(exact_world):
    logp, log_q, log_w, allowed, log_pa, log_pstar = _exact(exact_world)
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(16), atol=1e-5)
    assert torch.isneginf(log_q[:, ~allowed]).all()
    # w = prod Z_t = P(y)/q(y)   and   P(y)/q(y) / P(allowed) = P(y|allowed)/q(y)
    assert torch.allclose(log_w[:, allowed], (logp - log_q)[:, allowed], atol=1e-4)
    # brute-force q for one prompt: chain of renormalized conditionals
    p = logp[0].exp().view(5, 5, 5)
    q1 = p.sum((1, 2)); q1[4] = 0; q1 = q1 / q1.sum()
    q2 = p.sum(2) / p.sum((1, 2))[:, None]; q2[:, 4] = 0; q2 = q2 / q2.sum(1, keepdim=True)
    q3 = p / p.sum(2, keepdim=True); q3[..., 4] = 0; q3 = q3 / q3.sum(2, keepdim=True)
    q = q1[:, None, None] * q2[:, :, None] * q3
    assert torch.allclose(q.reshape(-1), log_q[0].exp(), atol=1e-5)


def test_corrected_sampler_unbiased_exact_world(exact_world):
    """Resampling from q by weights w: E[f] -> E_{P(.|allowed)}[f] as k grows (fixed seed)."""
    _, log_q, log_w, _, _, log_pstar = _exact(exact_world, (4,))  # ban 'd': TV(q, P(.|allowed)) ~ 0.3
    f = (log_q > log_pstar).double()  # [16, 125] 1 where q over-weights y: E_q f - E_* f = TV(q, P(.|allowed))
    exact = (log_pstar.exp() * f).sum(-1)
    naive = (log_q.exp() * f).sum(-1)
    g = torch.Generator().manual_seed(0)
    k, n = 64, 4000
    idx = torch.multinomial(log_q.exp(), n * k, replacement=True, generator=g).view(16, n, k)
    lw = log_w.gather(1, idx.view(16, -1)).view(16, n, k)
    pick = torch.multinomial(torch.softmax(lw, -1).view(-1, k), 1, generator=g).view(16, n)
    y = idx.gather(2, pick.unsqueeze(-1)).squeeze(-1)  # [16, n]
    est = f.gather(1, y).mean(-1)
    assert (est - exact).abs().max() < 0.03 < 0.1 < (naive - exact).abs().max()
    # the near-exact law of the resampler converges to P(y|allowed) at rate ~1/k
    from refimpl.resample import resampling_law

    law = resampling_law(log_q, log_w, [4, 32], generator=torch.Generator().manual_seed(1)).exp()
    tv = [0.5 * (law[i] - log_pstar.exp()).abs().sum(-1).mean() for i in range(2)]
    assert tv[1] < tv[0] / 5


def test_log_allowed_mass_and_samplers(arith_model):
    model, tok = arith_model
    prompts, ban = ["4 7 + 8 5 =", "0 9 + 3 3 ="], [tok.convert_tokens_to_ids("1")]
    s, log_w, ess = idle.corrected_sample(model, tok, prompts, ban, k=4, n=3, max_new_tokens=4, seed=0)
    assert len(s) == 6 and log_w.shape == (2, 3, 4)
    assert (log_w <= 1e-6).all() and (ess >= 1 - 1e-4).all()
    assert not torch.isin(s.completion_ids[s.completion_mask.bool()], torch.tensor(ban)).any()
    # log w = log P(y) - log q(y) on one completion, computed from sequence_logprobs
    logp, _ = lm.sequence_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    proc = idle.IDLELogitsProcessor(ban)
    P = s.prompt_ids.shape[1]
    ids = torch.cat([s.prompt_ids, s.completion_ids], 1)
    logits = lm.forward(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask).logits
    logq = proc(None, lm.completion_logits(logits, P).float()).gather(-1, ids[:, P:, None]).squeeze(-1)
    logq = (logq * s.completion_mask).sum(-1)
    lw = idle.log_allowed_mass(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, ban)
    assert torch.allclose(lw, logp.detach() - logq, atol=1e-4)
    three = [tok.convert_tokens_to_ids("3")]  # in about half the samples: some kept, some not, for any seed
    r, acc = idle.rejection_sample(model, tok, prompts, three, k=8, max_new_tokens=4, seed=0)
    assert acc.shape == (16,) and 0 < acc.float().mean() < 1
    with pytest.raises(ValueError, match="k"):
        idle.corrected_sample(model, tok, prompts, ban, k=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_cuda_agree(dtype):
    logits = torch.randn(8, 1000, dtype=torch.float32).to(dtype)
    proc = idle.IDLELogitsProcessor([1, 5, 999])
    a = proc(None, logits).float()
    b = proc(None, logits.cuda()).float().cpu()
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b)) and torch.allclose(a[fin], b[fin], atol=1e-2)
    assert len(proc._masks) == 2  # one cached mask per device


def test_beam_search_idle_finds_mode_of_q_masking_the_mode_of_the_conditional(exact_world):
    """transformers' beam search log-softmaxes *before* the processors: with I-DLE the beams add up
    log q(y), with -inf masking log P(y); an exhaustive beam (25 = V^2) returns each one's mode."""
    from transformers import GenerationConfig, SuppressTokensLogitsProcessor

    w, ban = exact_world, [4]
    logp, log_q, _, allowed, _, log_pstar = _exact(w, tuple(ban))
    ids, mask = w.prompt_batch()
    cfg = GenerationConfig(num_beams=25, do_sample=False, max_new_tokens=3, length_penalty=0.0,
                           pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    found = {}
    for name, proc in [("idle", idle.IDLELogitsProcessor(ban)), ("mask", SuppressTokensLogitsProcessor(ban, device="cpu"))]:
        out = w.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, logits_processor=[proc])
        y = w.completion_index(out.sequences[:, ids.shape[1]:])  # [16]
        found[name] = y
        score = (log_q if name == "idle" else logp).gather(1, y[:, None]).squeeze(1)
        assert torch.allclose(out.sequences_scores, score, atol=1e-4)  # the beam's score is log q / log P
    assert torch.equal(found["idle"], log_q.argmax(-1)) and torch.equal(found["mask"], log_pstar.argmax(-1))
    assert (found["idle"] != found["mask"]).any()  # the two differ on some prompts of this world


def test_log_z_tracked_during_generation_equals_forward_pass(exact_world):
    """log w from the processor (no extra forward) = log_allowed_mass (forward passes) = exact log w,
    for a fixed ban and for prefix-dependent bad words, across several generate calls."""
    from refimpl import constraints as C

    w = exact_world
    _, _, log_w_exact, _, _, _ = _exact(w)
    for ban in ([4], C.BadWords([[1, 2], [3, 3, 1]])):
        proc = idle.IDLELogitsProcessor(ban, track_temperature=0.7)
        s = lm.sample(w.model, w.tokenizer, w.prompts, k=8, max_new_tokens=3, temperature=0.7,
                      logits_processor=[proc], seed=0, batch_size=40)  # 4 generate calls
        tracked = proc.log_allowed_mass(s.completion_mask)
        fwd = idle.log_allowed_mass(w.model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                                    ban, temperature=0.7, batch_size=7)
        assert tracked.shape == (128,) and torch.allclose(tracked, fwd, atol=1e-4)
        assert (tracked < 0).any() and (tracked <= 1e-6).all()
    s = lm.sample(w.model, w.tokenizer, w.prompts, k=8, max_new_tokens=3, seed=1,
                  logits_processor=[proc := idle.IDLELogitsProcessor([4], track_temperature=1.0)])
    y = w.completion_index(s.completion_ids)
    assert torch.allclose(proc.log_allowed_mass(s.completion_mask), log_w_exact[s.prompt_index, y], atol=1e-4)


def test_log_allowed_mass_memory_is_bounded(exact_world):
    """Only the last T + 1 positions' logits are computed, and a batch's [rows, T + 1, V] stays
    within max_elements (one row at least)."""
    w = exact_world
    s = lm.sample(w.model, w.tokenizer, w.prompts, k=2, max_new_tokens=3, seed=0)
    shapes = []
    hook = w.model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        a = idle.log_allowed_mass(w.model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, [4],
                                  max_elements=4 * 4 * 5)
    finally:
        hook.remove()
    assert shapes == [(4, 4, 5)] * 8  # 32 rows, 4 at a time, T + 1 = 4 positions, V = 5
    b = idle.log_allowed_mass(w.model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, [4])
    assert torch.allclose(a, b, atol=1e-5)
    assert idle._rows_per_batch(257, 151_936, 2**26) == 1 and idle._rows_per_batch(5, 150_000, 2**26) == 89
    import numpy as np

    c = idle.log_allowed_mass(w.model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                              np.array([4]))  # NumPy integer ids
    assert torch.equal(b, c)
    for bad in (dict(max_elements=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            idle.log_allowed_mass(w.model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, [4], **bad)
