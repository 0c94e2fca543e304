"""refimpl.constraints: bad words against transformers, automata against brute force, the UTF-8
script ban against Python's decoder, and the real-model recipe on a random Qwen2 with a byte-level BPE."""
import codecs
import copy
import functools
import random

import numpy as np
import pytest
import torch
from transformers import NoBadWordsLogitsProcessor

from refimpl import constraints as C
from refimpl import idle, lm

torch.set_num_threads(1)


def _cjk(cp: int) -> bool:
    return any(a <= cp <= b for a, b in C.CJK_IDEOGRAPHS)


def _has_cjk(text: str) -> bool:
    return any(_cjk(ord(c)) for c in text)


# --- bad words -----------------------------------------------------------------------------------

def _brute_bad_words(ctx, words):
    """Tokens banned after the context ctx: last tokens of words whose other tokens end ctx."""
    return {w[-1] for w in words if len(w) == 1 or list(ctx[len(ctx) - len(w) + 1:]) == list(w[:-1])}


def test_bad_words_masks_match_brute_force_and_transformers():
    g = torch.Generator().manual_seed(0)
    words = [[5], [13, 6], [14, 15, 16], [13, 13, 13, 6], [10], [13, 10]]
    ids = torch.randint(13, 17, (256, 7), generator=g)
    bw = C.BadWords(words)
    state = bw.start(ids[:, :3])
    for t in range(3, 7):  # advance token by token = start on the longer context
        state = bw.advance(state, ids[:, t])
    mask = bw.banned(state, 20, "cpu")
    assert torch.equal(mask, bw.banned(bw.start(ids), 20, "cpu"))
    for i in range(256):
        assert set(mask[i].nonzero().flatten().tolist()) == _brute_bad_words(ids[i].tolist(), words)
    # transformers agrees except on the single-token ban of the stop token 10, which it drops;
    # a multi-token word ending in the stop token ([13, 10]) it keeps
    ref = torch.isneginf(NoBadWordsLogitsProcessor(words, eos_token_id=10)(ids, torch.randn(256, 20, generator=g)))
    keep = torch.arange(20) != 10
    assert torch.equal(ref[:, keep], mask[:, keep])
    assert mask[:, 10].all() and torch.equal(ref[:, 10], ids[:, -1] == 13) and 0 < int(ref[:, 10].sum()) < 256


def test_bad_words_generate_identical_to_transformers(arith_model):
    model, tok = arith_model
    bad = [[tok.convert_tokens_to_ids(w) for w in ws.split()] for ws in ["0", "2 3", "3 1 ;"]]
    prompts, eos = ["4 7 + 8 5 =", "0 9 + 3 3 ="], model.generation_config.eos_token_id  # 132, 42
    kw = dict(k=100, max_new_tokens=4, seed=3)
    ours = lm.sample(model, tok, prompts, logits_processor=[idle.IDLELogitsProcessor(C.BadWords(bad))], **kw)
    theirs = lm.sample(model, tok, prompts, logits_processor=[NoBadWordsLogitsProcessor(bad, eos)], **kw)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    V = len(tok)
    assert not C.violations(C.BadWords(bad), ours.prompt_ids, ours.completion_ids, ours.completion_mask, V).any()
    free = lm.sample(model, tok, prompts, **kw)
    assert C.violations(C.BadWords(bad), free.prompt_ids, free.completion_ids, free.completion_mask, V).float().mean() > 0.3


def test_stop_token_ban_kept_where_transformers_drops_it(arith_model):
    model, tok = arith_model
    eos = model.generation_config.eos_token_id
    scores = torch.randn(3, len(tok))
    ids = torch.tensor([[1, 30, 4]] * 3)
    assert torch.equal(NoBadWordsLogitsProcessor([[eos]], eos_token_id=eos)(ids, scores), scores)  # silently dropped
    ours = idle.IDLELogitsProcessor(C.BadWords([[eos]]))(ids, scores)
    assert torch.isneginf(ours[:, eos]).all()
    kw = dict(k=32, max_new_tokens=6, seed=0)
    theirs = lm.sample(model, tok, ["4 7 + 8 5 ="], logits_processor=[NoBadWordsLogitsProcessor([[eos]], eos)], **kw)
    ours = lm.sample(model, tok, ["4 7 + 8 5 ="], logits_processor=[idle.IDLELogitsProcessor(C.BadWords([[eos]]))], **kw)
    assert (theirs.completion_ids == eos).any() and not (ours.completion_ids == eos).any()
    assert (ours.completion_mask.sum(1) == 6).all()


# --- automata ------------------------------------------------------------------------------------

def _no_b_after_a(state, byte):
    """'b' may not follow 'a' (a character-level rule, run over bytes)."""
    return None if state == ord("a") and byte == ord("b") else byte


def test_automaton_exact_world_against_brute_force(exact_world):
    w = exact_world
    rule = C.Automaton(_no_b_after_a, 0, C.token_bytes(w.tokenizer))
    ids, _ = w.prompt_batch()
    P, N = len(w.prompts), len(w.completions)
    pids, comp = ids.repeat_interleave(N, 0), w.completion_ids.repeat(P, 1)
    ones = torch.ones_like(comp)
    bad = C.violations(rule, pids, comp, ones, 5)
    # <pad> (special) has no bytes: "a<pad>b" decodes to "ab"; the prompt is not read
    assert torch.equal(bad, torch.tensor(["ab" in c.replace("_", "") for c in w.completions] * P))
    # exact q(y) = P(y) / w(y) on allowed y sums to one; the processor in generate samples it
    logp = w.logp().detach()
    log_w = idle.log_allowed_mass(w.model, pids, torch.ones_like(pids), comp, ones, rule).view(P, N)
    log_q = (logp - log_w).masked_fill(bad.view(P, N), float("-inf"))
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(P), atol=1e-5)
    s = lm.sample(w.model, w.tokenizer, [w.prompts[6]], k=4000, max_new_tokens=3,
                  logits_processor=[idle.IDLELogitsProcessor(rule)], seed=0)
    freq = torch.bincount(w.completion_index(s.completion_ids), minlength=N).float() / 4000
    assert freq[bad[:N]].sum() == 0 and 0.5 * (freq - log_q[6].exp()).abs().sum() < 0.05


def _bytewise_table(rule, token_bytes, s):
    """Next state of every token from state s, by running the byte-level step token by token."""
    out = []
    for b in token_bytes:
        st = rule._states[s]
        for byte in (b or b""):
            st = None if st is None else rule.step(st, byte)
        out.append(-1 if st is None else rule._ids.get(st, -2))
    return out


# --- following a constraint through generate: every decoding mode ------------------------------

def _one_d(state, byte):
    """At most one 'd' in the completion (state: the count so far; a second 'd' is dead)."""
    return (None if state == 1 else 1) if byte == ord("d") else state


def _reference_masks(rule, ids, P, V):
    """[N, V] banned masks of the rows of ids [N, L] whose prompt is ids[:, :P], from scratch."""
    state = rule.start(ids[:, :P])
    for t in range(P, ids.shape[1]):
        state = rule.advance(state, ids[:, t])
    return rule.banned(state, V, "cpu")


def test_tracker_replays_calls_in_any_order(exact_world):
    """Calls as the decoding modes make them -- one token per call, rows reordered (beam search),
    several tokens at once and back to a shorter prefix (assisted decoding), the same prefix twice,
    a few calls long forgotten -- give the masks computed from the prompt, row by row."""
    from refimpl import tracking

    tb, g = C.token_bytes(exact_world.tokenizer), torch.Generator().manual_seed(0)
    rules = [C.Automaton(_one_d, 0, tb), C.BadWords([[2, 2], [3, 1, 4]])]
    for rule in rules:
        tr, P = tracking.Tracker(rule, history=3), 2
        seq = torch.randint(1, 5, (6, 14), generator=g)  # 6 rows: prompt of 2 + 12 tokens
        assert torch.equal(tr.banned(seq[:, :P], 5, "cpu"), _reference_masks(rule, seq[:, :P], P, 5))
        kinds, length, rows = [tr.kind], P, torch.arange(6)  # a generation starts with its prompts
        for step in range(40):
            if step % 3 == 1 and length < 14:  # the next token of the same rows (sampling, greedy)
                length += 1
            else:  # back off, stay or jump ahead, on some rows in some order
                length = max(P, min(14, length + int(torch.randint(-3, 4, (), generator=g))))
                rows = torch.randperm(6, generator=g)[: int(torch.randint(1, 7, (), generator=g))]
            if step % 7 == 3:  # a rejected draft: the same prefix with other next tokens
                seq[:, length:] = torch.randint(1, 5, (6, 14 - length), generator=g)
            ids = seq[rows, :length]
            assert torch.equal(tr.banned(ids, 5, "cpu"), _reference_masks(rule, ids, P, 5))
            kinds.append(tr.kind)
        assert {"new", "step", "other"} <= set(kinds)
        tr.reset()
        assert torch.equal(tr.banned(seq[:, :9], 5, "cpu"), _reference_masks(rule, seq[:, :9], 9, 5))
        assert tr.kind == "new"  # after reset the rows are prompts


def _generate_rows(model, tok, prompts, proc, **kw):
    """(prompt ids, completion ids) of model.generate on each prompt (one call per prompt)."""
    out = []
    for p in prompts:
        enc = tok([p], return_tensors="pt")
        seq = model.generate(**enc, max_new_tokens=10, logits_processor=[proc()] if proc else None, pad_token_id=0, **kw)
        out += [(enc["input_ids"][0], row[enc["input_ids"].shape[1]:]) for row in seq]
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


@pytest.mark.parametrize("mode", ["sample", "greedy", "beam", "beam_sample", "assisted_greedy", "assisted_sample",
                                  "prompt_lookup"])
def test_constraint_holds_in_every_generate_mode(exact_world, mode, one_thread):
    """"At most one d" over 10 tokens (the model was trained on 3): no mode lets a second d through;
    without the ban most prompts write one; assisted greedy decoding returns plain greedy's output."""
    w = exact_world
    rule = C.Automaton(_one_d, 0, C.token_bytes(w.tokenizer))
    assistant = copy.deepcopy(w.model)
    kw = {"sample": dict(do_sample=True, num_return_sequences=4),
          "greedy": dict(do_sample=False),
          "beam": dict(do_sample=False, num_beams=4, num_return_sequences=2),
          "beam_sample": dict(do_sample=True, num_beams=3, num_return_sequences=3),
          "assisted_greedy": dict(do_sample=False, assistant_model=assistant),
          "assisted_sample": dict(do_sample=True, assistant_model=assistant),
          "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=2, max_matching_ngram_size=1,
                                eos_token_id=0)}[mode]  # transformers 4.56's prompt lookup needs a stop token
    torch.manual_seed(0)
    prompts = w.prompts if mode != "assisted_sample" else w.prompts * 3
    pids, comp = _generate_rows(w.model, w.tokenizer, prompts, lambda: idle.IDLELogitsProcessor(rule), **kw)
    assert not C.violations(rule, pids, comp, torch.ones_like(comp), 5).any()
    if mode in ("greedy", "assisted_greedy", "prompt_lookup"):
        free = _generate_rows(w.model, w.tokenizer, w.prompts, None, **kw)
        assert C.violations(rule, *free, torch.ones_like(free[1]), 5).sum() >= 4  # the ban has work to do
        plain = _generate_rows(w.model, w.tokenizer, w.prompts, lambda: idle.IDLELogitsProcessor(rule), do_sample=False,
                               eos_token_id=kw.get("eos_token_id"))
        assert torch.equal(comp, plain[1])  # greedy, assisted or not, is one decoder


def test_drafted_prefix_with_a_banned_token_gets_no_token(exact_world):
    """Assisted decoding verifies a draft that may already hold a banned token (transformers 4.56's
    prompt lookup does not filter drafts): that row gets all -inf and no error; a row whose
    state allows nothing, with no banned token taken, still raises."""
    rule = C.Automaton(_one_d, 0, C.token_bytes(exact_world.tokenizer))
    proc, scores = idle.IDLELogitsProcessor(rule), torch.randn(2, 5)
    proc(torch.tensor([[1, 1], [2, 3]]), scores)  # the prompts
    out = proc(torch.tensor([[1, 1, 4, 4], [2, 3, 4, 2]]), scores)  # row 0 took a second 'd'
    assert torch.isneginf(out[0]).all() and torch.isneginf(out[1, 4]) and torch.isfinite(out[1, :4]).all()
    with pytest.raises(ValueError, match="no finite allowed token"):
        idle.IDLELogitsProcessor(C.BadWords([[v] for v in range(5)]))(torch.tensor([[1, 1]]), scores[:1])


def test_tracking_log_z_refuses_reordering_modes(exact_world):
    """Recording log Z_t needs rows in a fixed order: beam search and assisted decoding raise."""
    w = exact_world
    enc = w.tokenizer([w.prompts[0]], return_tensors="pt")
    for kw in (dict(num_beams=3), dict(assistant_model=copy.deepcopy(w.model))):
        proc = idle.IDLELogitsProcessor([4], track_temperature=1.0)
        with pytest.raises(ValueError, match="track_temperature|completion_mask"):
            out = w.model.generate(**enc, max_new_tokens=10, do_sample=False, logits_processor=[proc], pad_token_id=0,
                                   **kw)
            proc.log_allowed_mass(torch.ones(1, out.shape[1] - 2))


# --- UTF-8 script ban ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _completions(p: bytes) -> tuple[bool, bool]:
    """Brute force over the well-formed completions of the partial character p: (any exist, all are CJK)."""
    found = False
    for b in range(0x80, 0xC0):
        try:
            sub = (True, _cjk(ord((p + bytes([b])).decode())))
        except UnicodeDecodeError as e:
            sub = _completions(p + bytes([b])) if e.reason == "unexpected end of data" else (False, True)
        if sub == (True, False):
            return True, False
        found = found or sub[0]
    return found, True


def _oracle(pending: bytes, data: bytes):
    """(dies, pending after) for bytes fed after a pending partial character, by Python's decoder.

    CPython's incremental decoder also buffers prefixes with no well-formed completion (ED A0, a
    surrogate); they decode to U+FFFD whatever follows, so they count as no pending character."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    dec.decode(pending)
    held = dec.getstate()[0]
    for b in data:
        text, held = dec.decode(bytes([b])), dec.getstate()[0]
        if _has_cjk(text) or (held and all(_completions(held))):
            return True, None
    return False, held if held and _completions(held)[0] else b""


def test_utf8_step_matches_python_decoder():
    step = C.Utf8Ban(C.CJK_IDEOGRAPHS)
    rng = random.Random(0)
    pendings = [b""] + [bytes([b]) for b in range(0xC2, 0xF5)]
    pendings += [p for p in (bytes([rng.randrange(0xE0, 0xF5), rng.randrange(0x80, 0xC0)]) for _ in range(400))
                 if not _oracle(b"", p)[0] and _oracle(b"", p)[1] == p][:150]
    for p in pendings:
        for b in range(256):
            dies, after = _oracle(p, bytes([b]))
            got = step(tuple(p), b)
            assert (got is None) == dies, (p, b)
            assert dies or got == tuple(after), (p, b, got, after)
    assert step((), 0xE5) is None and step((), 0xE4) == (0xE4,)  # U+5000.. all banned; U+4000.. not all
    assert step((0xE4,), 0xB8) is None and step((), ord("A")) == ()
    assert C.Utf8Ban([(0x41, 0x41)])((), ord("A")) is None  # a banned ASCII letter
    assert C.Utf8Ban([(0xFFFD, 0xFFFD)])((), 0x80) is None  # a stray byte decodes to U+FFFD


TEXT = ["안녕하세요, 오늘 날씨가 정말 좋네요. 한국어로 답변해 주세요.",
        "我们今天去北京吃饭。中文字符不应该出现在韩国语的回答里。",
        "Hello world, this is English text with numbers 123 and 456.",
        "서울은 한국의 수도입니다. 北京是中国的首都。 Tokyo is the capital of Japan.",
        "감사합니다! 谢谢！ Thank you! 😀 𠀋 emoji and a rare ideograph."] * 3


@pytest.fixture(scope="module")
def qwen_like():
    """A byte-level BPE trained on the fly (ByteLevel pre-tokenizer and decoder, as Qwen2's) and a
    random 2-layer Qwen2ForCausalLM with peaked next-token distributions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      special_tokens=["<|endoftext|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])  # as Qwen2's
    torch.manual_seed(0)
    eos = tok.eos_token_id
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         eos_token_id=eos, pad_token_id=eos, bos_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked distributions, so that min_p and friends would matter
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, eos
    return model, tok


def test_token_bytes_and_tables(qwen_like):
    _, tok = qwen_like
    tb = C.token_bytes(tok)
    assert tb[tok.eos_token_id] is None
    for i, b in enumerate(tb):  # each token decodes to its bytes (as a lone token)
        assert b is None or b.decode("utf-8", "replace") == tok.decode([i])
    ban = C.script_ban(tok)
    assert ban.table(ban.initial).tolist() == _bytewise_table(ban, tb, ban.initial)
    state = ban.start(torch.zeros(1, 1, dtype=torch.long))
    partial = next(i for i, b in enumerate(tb) if b and _oracle(b"", b) == (False, b[-1:]) and b[-1] >= 0xE0)
    state = ban.advance(state, torch.tensor([partial]))  # a token ending in a lead byte
    s = int(state)
    assert s != ban.initial and ban.table(s).tolist() == _bytewise_table(ban, tb, s)


def test_script_ban_against_decoder_on_token_sequences(qwen_like):
    _, tok = qwen_like
    tb, ban = C.token_bytes(tok), C.script_ban(tok)
    rng, seen = random.Random(1), set()
    for _ in range(40):
        state, pending = ban.start(torch.zeros(1, 1, dtype=torch.long)), b""
        for _ in range(6):
            mask = ban.banned(state, len(tok), "cpu")[0]
            for v in range(len(tok)):
                assert bool(mask[v]) == _oracle(pending, tb[v] or b"")[0], (pending, tb[v])
            allowed = (~mask).nonzero().flatten().tolist()
            v = rng.choice([a for a in allowed if tb[a] and tb[a][-1] >= 0x80] or allowed)  # favour partial chars
            pending = _oracle(pending, tb[v] or b"")[1]
            seen.add(pending)
            state = ban.advance(state, torch.tensor([v]))
    assert len(seen) >= 10  # many pending partial characters were visited


def test_real_model_recipe_no_cjk(qwen_like):
    model, tok = qwen_like
    prompts, kw = ["한국어로 답변해 주세요:", "Answer in Korean:"], dict(k=32, max_new_tokens=24, seed=0)
    ban = C.script_ban(tok, C.CJK_IDEOGRAPHS)
    free = lm.sample(model, tok, prompts, **kw)
    assert sum(map(_has_cjk, free.texts)) > 5  # without the ban, Chinese characters appear
    s = lm.sample(model, tok, prompts, logits_processor=[idle.IDLELogitsProcessor(ban)], **kw)
    assert not any(map(_has_cjk, s.texts))
    assert sum(any(0xAC00 <= ord(c) <= 0xD7A3 for c in t) for t in s.texts) > 5  # Hangul is still written
    c = idle.corrected_sample(model, tok, prompts, ban, k=4, n=3, max_new_tokens=24, seed=0)
    assert len(c.samples) == 6 and not any(map(_has_cjk, c.samples.texts))
    assert torch.isfinite(c.log_w).all() and (c.log_w <= 1e-6).all() and (c.ess >= 1 - 1e-4).all()
    r = idle.rejection_sample(model, tok, prompts, ban, k=32, max_new_tokens=24, seed=0)
    tb = C.token_bytes(tok)
    dies = [_oracle(b"", b"".join(tb[i] or b"" for i, m in zip(row, mrow) if m))[0]
            for row, mrow in zip(r.samples.completion_ids.tolist(), r.samples.completion_mask.tolist())]
    assert r.accepted.tolist() == [not d for d in dies] and 0 < sum(dies) < len(dies)
    assert not any(_has_cjk(t) for t, a in zip(r.samples.texts, r.accepted) if a)


def test_inherited_generation_config_is_neutralized(qwen_like):
    model, tok = qwen_like
    other = copy.deepcopy(model)
    other.generation_config.repetition_penalty = 1.3
    other.generation_config.no_repeat_ngram_size = 2
    other.generation_config.min_p = 0.1
    ban, kw = C.script_ban(tok), dict(k=16, max_new_tokens=16, seed=0)
    a = lm.sample(model, tok, ["한국어로:"], logits_processor=[idle.IDLELogitsProcessor(ban)], **kw)
    b = lm.sample(other, tok, ["한국어로:"], logits_processor=[idle.IDLELogitsProcessor(ban)], **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    enc = tok(["한국어로:"] * 16, return_tensors="pt")  # plain generate does apply them
    outs = []
    for m in (model, other):
        torch.manual_seed(0)
        outs.append(m.generate(**enc, do_sample=True, max_new_tokens=16))
    assert outs[0].shape != outs[1].shape or not torch.equal(outs[0], outs[1])


def test_bad_input():
    with pytest.raises(ValueError, match="bad_words"):
        C.BadWords([])
    with pytest.raises(TypeError, match="bad_words"):
        C.BadWords("ab")
    with pytest.raises(TypeError, match=r"bad_words\[1\]"):
        C.BadWords([[1], []])
    with pytest.raises(ValueError, match=r"bad_words\[0\]"):
        C.BadWords([[1, -2]])
    with pytest.raises(TypeError, match=r"bad_words\[0\]"):
        C.BadWords([[1.5]])
    assert C.BadWords([[np.int64(3), np.int32(4)]]).words == ((3, 4),)  # NumPy ints are ints
    with pytest.raises(ValueError, match="bad_words"):
        C.BadWords([[7]]).banned(torch.zeros(1, 0, dtype=torch.long), 5, "cpu")  # out of the vocabulary
    with pytest.raises(TypeError, match="step"):
        C.Automaton(3, 0, [b"a"])
    with pytest.raises(TypeError, match="token_bytes"):
        C.Automaton(_no_b_after_a, 0, ["a"])
    with pytest.raises(ValueError, match="ranges"):
        C.Utf8Ban([(0x9FFF, 0x4E00)])
    with pytest.raises(ValueError, match="ranges"):
        C.Utf8Ban([(0, 0x110000)])
    with pytest.raises(TypeError, match="input_ids"):
        idle.IDLELogitsProcessor(C.BadWords([[1, 2]]))(None, torch.randn(2, 5))
    with pytest.raises(TypeError, match="banned_ids"):
        C.as_constraint("abc")
