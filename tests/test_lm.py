"""refimpl.lm on GPT-2, Llama and Qwen2 configurations: padding, sampling, embeddings, errors."""
import pytest
import torch

from refimpl import lm
from refimpl.worlds import arith

from conftest import DEVICES


def _tiny(arch: str, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.convert_tokens_to_ids(arith.STOP))
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common))
    else:
        cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        m = model_cls(cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common))
    return m.eval()


ARCHS = ["gpt2", "llama", "qwen2"]


@pytest.fixture(scope="module")
def tok():
    return arith.build_tokenizer()


def _batch(tok, device="cpu"):
    prompts = ["7 =", "12 = 3", "( 1 + 2 ) * 3 ="]
    enc = tok(prompts, return_tensors="pt", padding=True)
    comps = [["3", "+", "4", ";"], ["+", "9"], ["-", "1", "2", ";"]]
    T = max(map(len, comps))
    ids = torch.full((3, T), tok.pad_token_id)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(tok.convert_tokens_to_ids(c))
        mask[i, : len(c)] = 1
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), ids.to(device), mask.to(device), comps, prompts


def _unpadded_logprobs(model, tok, prompt, comp):
    """Brute force: one unpadded sequence, per-token log-probs of the completion."""
    p = tok(prompt, return_tensors="pt")["input_ids"][0]
    c = torch.tensor(tok.convert_tokens_to_ids(comp))
    x = torch.cat([p, c]).unsqueeze(0)
    out = model(input_ids=x, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, len(p) - 1 : -1].float(), -1)
    return logp.gather(-1, c.unsqueeze(-1)).squeeze(-1), [h[0, -1] for h in out.hidden_states]


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_logprobs_padding_correct(arch, tok):
    model = _tiny(arch, tok)
    pids, pmask, cids, cmask, comps, prompts = _batch(tok)
    assert (pmask[:, 0] == 0).any()  # the batch really is left-padded
    total, per_token = lm.sequence_logprobs(model, pids, pmask, cids, cmask)
    for i in range(3):
        ref, _ = _unpadded_logprobs(model, tok, prompts[i], comps[i])
        n = len(comps[i])
        torch.testing.assert_close(per_token[i, :n], ref, atol=1e-5, rtol=1e-5)
        assert (per_token[i, n:] == 0).all()
        torch.testing.assert_close(total[i], ref.sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_prompts_equal_left_padded(arch, tok):
    model = _tiny(arch, tok)
    pids, pmask, cids, cmask, *_ = _batch(tok)
    tok.padding_side = "right"
    enc = tok(["7 =", "12 = 3", "( 1 + 2 ) * 3 ="], return_tensors="pt", padding=True)
    tok.padding_side = "left"
    assert (enc["attention_mask"][:, -1] == 0).any()
    a, _ = lm.sequence_logprobs(model, pids, pmask, cids, cmask)
    b, _ = lm.sequence_logprobs(model, enc["input_ids"], enc["attention_mask"], cids, cmask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_is_last_completion_token_state(arch, tok):
    model = _tiny(arch, tok)
    pids, pmask, cids, cmask, comps, prompts = _batch(tok)
    for layer in (0, 1, -1):
        phi = lm.embed(model, pids, pmask, cids, cmask, layer=layer)
        for i in range(3):
            _, hs = _unpadded_logprobs(model, tok, prompts[i], comps[i])
            torch.testing.assert_close(phi[i], hs[layer], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer"):
        lm.embed(model, pids, pmask, cids, cmask, layer=10)


def test_left_align_and_completion_mask():
    ids = torch.tensor([[5, 6, 0, 0], [0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    a, m = lm.left_align(ids, mask)
    assert a.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]] and m.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    c = torch.tensor([[4, 2, 9, 9], [4, 4, 4, 4], [2, 2, 2, 2]])
    assert lm.completion_mask(c, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lm.completion_mask(c, [9, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lm.completion_mask(c, None).tolist() == [[1] * 4] * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_shapes_seed_and_greedy(arch, tok):
    model = _tiny(arch, tok)
    s1 = lm.sample(model, tok, ["7 =", "12 ="], k=3, max_new_tokens=5, seed=1)
    s2 = lm.sample(model, tok, ["7 =", "12 ="], k=3, max_new_tokens=5, seed=1)
    assert len(s1) == 6 and s1.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(s1.completion_ids, s2.completion_ids) and s1.texts == s2.texts
    stop = tok.convert_tokens_to_ids(arith.STOP)
    assert torch.equal(s1.completion_mask, lm.completion_mask(s1.completion_ids, stop))
    g = lm.sample(model, tok, ["7 ="], k=2, max_new_tokens=4, temperature=0)
    assert torch.equal(g.completion_ids[0], g.completion_ids[1])
    # Greedy: each token is the argmax under the model given the previous ones.
    _, per_token = lm.sequence_logprobs(model, g.prompt_ids[:1], g.prompt_mask[:1], g.completion_ids[:1], g.completion_mask[:1])
    logits = model(input_ids=torch.cat([g.prompt_ids[:1], g.completion_ids[:1]], 1)).logits[0]
    P = g.prompt_ids.shape[1]
    n = int(g.completion_mask[0].sum())
    assert (logits[P - 1 : P - 1 + n].argmax(-1) == g.completion_ids[0, :n]).all()


def test_sampling_distribution_matches_sequence_logprobs(exact_world):
    """Sampling and scoring agree: empirical frequencies of 4000 draws vs exp(log pi) (TV < 0.06)."""
    w = exact_world
    s = lm.sample(w.model, w.tokenizer, [w.prompts[3]], k=4000, max_new_tokens=3, seed=0)
    idx = w.completion_index(s.completion_ids)
    freq = torch.bincount(idx, minlength=len(w.completions)).float() / len(idx)
    p = w.logp()[3].exp().detach()
    assert 0.5 * (freq - p).abs().sum() < 0.06
    # Temperature: scoring at temperature T is the distribution sampled at temperature T.
    s = lm.sample(w.model, w.tokenizer, [w.prompts[3]], k=4000, max_new_tokens=3, temperature=0.5, seed=0)
    freq = torch.bincount(w.completion_index(s.completion_ids), minlength=len(w.completions)).float() / 4000
    ids, mask = w.prompt_batch()
    c = w.completion_ids
    logp_T, _ = lm.sequence_logprobs(w.model, ids[3:4].expand(len(c), -1), mask[3:4].expand(len(c), -1), c,
                                     torch.ones_like(c), temperature=0.5)
    assert 0.5 * (freq - logp_T.exp().detach()).abs().sum() < 0.06


def test_sample_validation(tok):
    model = _tiny("gpt2", tok)
    with pytest.raises(TypeError, match="prompts"):
        lm.sample(model, tok, "7 =")
    with pytest.raises(ValueError, match="k"):
        lm.sample(model, tok, ["7 ="], k=0)
    with pytest.raises(ValueError, match="top_p"):
        lm.sample(model, tok, ["7 ="], top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        lm.sample(model, tok, ["7 ="], temperature=-1.0)
    pids, pmask, cids, cmask, *_ = _batch(tok)
    with pytest.raises(ValueError, match="completion_mask"):
        lm.sequence_logprobs(model, pids, pmask, cids, cmask[:, :2])
    with pytest.raises(ValueError, match="rows"):
        lm.sequence_logprobs(model, pids[:2], pmask[:2], cids, cmask)
    with pytest.raises(ValueError, match="temperature"):
        lm.sequence_logprobs(model, pids, pmask, cids, cmask, temperature=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_and_device(device, tok):
    model = _tiny("llama", tok).to(device)
    pids, pmask, cids, cmask, *_ = _batch(tok, device)
    total, _ = lm.sequence_logprobs(model, pids, pmask, cids, cmask)
    assert total.device.type == device
    total.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree(tok):
    model = _tiny("qwen2", tok)
    pids, pmask, cids, cmask, *_ = _batch(tok)
    a, _ = lm.sequence_logprobs(model, pids, pmask, cids, cmask)
    b, _ = lm.sequence_logprobs(model.cuda(), pids.cuda(), pmask.cuda(), cids.cuda(), cmask.cuda())
    torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)


def test_embed_layers_matches_embed_and_reads_before_the_final_norm(arith_model):
    model, tok = arith_model
    s = lm.sample(model, tok, ["1 2 + 3 4 =", "9 9 + 0 1 + 5 5 ="], k=3, max_new_tokens=4, seed=0)
    args = (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    for before_last in (False, True):
        h = lm.embed_layers(model, *args, before_last=before_last, batch_size=4)
        L = model.config.n_layer
        assert h.shape == (6, L + 2, model.config.n_embd)
        for layer in range(L):
            torch.testing.assert_close(h[:, layer], lm.embed(model, *args, layer=layer, before_last=before_last))
        torch.testing.assert_close(h[:, L + 1], lm.embed(model, *args, layer=-1, before_last=before_last))
        torch.testing.assert_close(model.transformer.ln_f(h[:, L]), h[:, L + 1], atol=1e-5, rtol=0)  # the norm is all that differs
    both = lm.embed_layers(model, *args, before_last=None)
    torch.testing.assert_close(both[:, 1], lm.embed_layers(model, *args, before_last=True))
