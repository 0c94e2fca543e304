"""GVPO through TRL's GRPOTrainer: the loss equals refimpl.gvpo.gvpo_loss on the same batch, the
update does not depend on gradient accumulation, conflicting settings and unscored completions
raise, tool tokens are masked, TRL's unused old-log-prob pass is skipped, the KL to the reference is
logged with either anchor, the reference takes the policy's quantization, the authors' regime
builds, and a changed TRL private API fails loudly. Two processes: test_trl_gvpo_multiprocess.py."""
import copy
import importlib
import os

import pytest
import torch


def _optional(module: str):
    """Import an optional dependency, or skip; under ``REFIMPL_REQUIRE_OPTIONAL=1`` (``dev.py test``
    and ``dev.py lowest``, which install it) a failed import is an error, never a silent skip."""
    if os.environ.get("REFIMPL_REQUIRE_OPTIONAL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


trl = _optional("trl")
datasets = _optional("datasets")

import refimpl  # noqa: E402
from refimpl import lm, trl_gvpo  # noqa: E402
from refimpl.gvpo import gvpo_loss  # noqa: E402
from refimpl.trl_gvpo import GVPOTrainer, GVPOTrainerConfig  # noqa: E402
from refimpl.worlds import arith  # noqa: E402

torch.set_num_threads(1)


def _reward(completions, target, **kwargs):
    return arith.reward([c.split(arith.STOP)[0] for c in completions], target).tolist()


def _spread_reward(completions, **kwargs):
    """A deterministic reward that differs between most distinct completions."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


def _setup(n_prompts=16):
    refimpl.config.quiet()
    model, tok = refimpl.load_model("refimpl/toy-arith", device="cpu")
    tok.eos_token = arith.STOP  # TRL stops and masks at the tokenizer's eos
    texts, targets = arith.prompts("train")
    data = datasets.Dataset.from_dict({"prompt": texts[:n_prompts], "target": targets[:n_prompts]})
    return model, tok, data


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_completion_length=6, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, gvpo_beta=0.1,
                bf16=False)  # GRPOConfig defaults to bf16 autocast, even on CPU; compare in float32
    return GVPOTrainerConfig(**{**base, **kw})


class _Recording(GVPOTrainer):
    """Records TRL's loss and refimpl's on the same tensors, with an anchor computed independently."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, batch_size=None, **kwargs):
        self.passes.append((input_ids.shape[0], batch_size))
        return super()._get_per_token_logps_and_entropies(model, input_ids, *args, batch_size=batch_size, **kwargs)

    def _generate_and_score_completions(self, inputs):
        if self.args.gvpo_anchor == "old":
            self.generating_policy.load_state_dict(self.accelerator.unwrap_model(self.model).state_dict())
        return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        k = self.num_generations
        args = (inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])
        anchor = self.reference if self.args.gvpo_anchor == "reference" else self.generating_policy
        with torch.no_grad():
            logp = lm.sequence_logprobs(model, *args)[0].view(-1, k)
            logp_anchor = lm.sequence_logprobs(anchor, *args)[0].view(-1, k)
        ours = gvpo_loss(logp, logp_anchor, inputs["advantages"].view(-1, k), self.args.gvpo_beta)
        groups = inputs["prompt_ids"].view(-1, k, inputs["prompt_ids"].shape[1])
        accumulated = self.current_gradient_accumulation_steps if model.training else 1
        centred = inputs["advantages"].view(-1, k).sum(1).abs().max().item()
        self.seen.append((loss.item() * accumulated, ours.item(), groups.shape[0],
                          bool((groups == groups[:, :1]).all()), centred))
        with torch.no_grad():  # the KL to the reference, whatever the anchor
            kl = (logp - lm.sequence_logprobs(self.reference, *args)[0].view(-1, k)).mean().item()
        self.kl.append((self._metrics["train" if model.training else "eval"]["gvpo/kl_ref"][-1], kl))
        return loss


@pytest.mark.parametrize("anchor,reduction", [("old", "mean"), ("reference", "mean"), ("old", "sum")])
def test_trl_gvpo_loss_matches_refimpl(tmp_path, anchor, reduction):
    model, tok, data = _setup()
    initial = copy.deepcopy(model)  # before TRL patches the model's forward
    before = [p.detach().clone() for p in model.parameters()]
    # two optimizer steps per generation batch, reused twice: TRL computes old_per_token_logps
    args = _config(tmp_path, per_device_train_batch_size=8, num_generations=4, steps_per_generation=2,
                   gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, num_iterations=2,
                   gvpo_anchor=anchor, gvpo_reduction=reduction)
    trainer = _Recording(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok)
    trainer.seen, trainer.passes, trainer.kl = [], [], []
    trainer.reference, trainer.generating_policy = initial, copy.deepcopy(initial)
    assert trainer.gvpo_ref_model is not None and trainer.gvpo_ref_model is not model  # gvpo_log_kl_ref's default
    trainer.train()
    assert len(trainer.seen) == 4
    for trl_loss_unscaled, ours, groups, whole_groups, centred in trainer.seen:
        assert whole_groups and centred < 1e-5  # groups intact, rewards centred, not std-scaled
        expected = ours * (groups if reduction == "sum" else 1)  # "sum" = groups × "mean"
        assert abs(trl_loss_unscaled - expected) <= 1e-5 * max(1.0, abs(expected))
    assert max(ours for _, ours, *_ in trainer.seen) > 0  # later micro-batches move away from the anchor
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # one generation batch of 16: the reference pass and, for the "old" anchor only, TRL's old-log-prob pass, in
    # chunks of 8, then 4 losses (the reference anchor does not need TRL's pass: it is skipped)
    anchor_passes = [(16, 8)] * (2 if anchor == "old" else 1)
    assert trainer.passes == anchor_passes + [(8, None)] * 4
    # evaluation: 4 prompts × 4 completions in micro-batches of 8, the loss not divided for accumulation; the anchor
    # is the current policy, so TRL's old-log-prob pass is skipped for either anchor, the reference pass runs
    trainer.seen, trainer.passes = [], []
    trainer.evaluate(eval_dataset=data.select(range(4)))
    assert len(trainer.seen) == 2
    assert trainer.passes == [(8, 8), (8, None)] * 2
    for trl_loss, ours, groups, whole_groups, centred in trainer.seen:
        assert whole_groups and abs(trl_loss - ours * (groups if reduction == "sum" else 1)) <= 1e-5 * max(1, ours)
    assert len(trainer.kl) == 6 and max(abs(kl) for _, kl in trainer.kl) > 1e-4  # the policy moved from the reference
    for logged, kl in trainer.kl:
        assert abs(logged - kl) <= 1e-5 * max(1.0, abs(kl))


def test_peft_reference_is_the_policy_without_adapters(tmp_path):
    peft = _optional("peft")
    model, tok, data = _setup()
    initial = copy.deepcopy(model)
    # a new generation batch at each of 3 steps: the later ones are drawn after LoRA updates
    args = _config(tmp_path, per_device_train_batch_size=8, num_generations=4, max_steps=3, learning_rate=1e-2,
                   gvpo_anchor="reference")
    trainer = _Recording(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    trainer.seen, trainer.passes, trainer.kl, trainer.reference = [], [], [], initial
    assert trainer.gvpo_ref_model is None  # no copy: the adapters are switched off for the anchor pass
    trainer.train()
    assert len(trainer.seen) == 3 and trainer.passes == [(8, 8), (8, None)] * 3
    for trl_loss_unscaled, ours, *_ in trainer.seen:
        assert abs(trl_loss_unscaled - ours) <= 1e-5 * max(1.0, abs(ours))
    with torch.no_grad():  # the adapters did move the policy away from the anchor
        x = dict(input_ids=torch.tensor([[12, 13, 14]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
        assert (trainer.model(**x).logits - initial(**x).logits).abs().max() > 1e-3


class _FixedSampling(GVPOTrainer):
    """Generation under a fixed seed, so that two runs sample the same completions."""

    def _generate(self, prompts):
        with torch.random.fork_rng():
            torch.manual_seed(123)
            return super()._generate(prompts)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.generated = out["completion_ids"].clone()
        return out


def _one_step(tmp_path, accumulation, reduction="mean"):
    """(parameter update, completions) after one SGD step on 2 prompts × 4 completions."""
    model, tok, data = _setup(n_prompts=8)
    before = [p.detach().clone() for p in model.parameters()]
    args = _config(tmp_path, per_device_train_batch_size=8 // accumulation, num_generations=4,
                   gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                   max_grad_norm=0.0, gvpo_reduction=reduction, temperature=2.0)
    trainer = _FixedSampling(model=model, reward_funcs=_spread_reward, args=args, train_dataset=data,
                             processing_class=tok)
    trainer.train()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], trainer.generated


def test_update_does_not_depend_on_gradient_accumulation(tmp_path):
    one, completions_one = _one_step(tmp_path / "a", accumulation=1)
    two, completions_two = _one_step(tmp_path / "b", accumulation=2)
    assert torch.equal(completions_one, completions_two)  # same data in both runs
    scale = max(d.abs().max().item() for d in one)
    assert scale > 1e-4  # rewards differ within groups: a real update
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)
    # the authors' "sum": groups per micro-batch (here 2) × the mean's update
    summed, completions_sum = _one_step(tmp_path / "c", accumulation=1, reduction="sum")
    assert torch.equal(completions_one, completions_sum)
    for a, b in zip(one, summed):
        torch.testing.assert_close(2 * a, b, rtol=0, atol=1e-5 * scale)


def test_tool_tokens_are_masked(tmp_path):
    model, tok, data = _setup(n_prompts=4)
    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=1)
    trainer = GVPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, len(tok), (4, 3), generator=g)  # any non-special ids of the vocabulary
    completion_ids = torch.randint(4, len(tok), (4, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    tool_mask = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                  completion_mask=completion_mask)
    with torch.no_grad():
        _, per_token = lm.sequence_logprobs(model, prompt_ids, inputs["prompt_mask"], completion_ids, completion_mask)
        with_tools, _ = trainer._gvpo_logps(trainer.model, {**inputs, "tool_mask": tool_mask})
        without, _ = trainer._gvpo_logps(trainer.model, inputs)
    torch.testing.assert_close(with_tools, (per_token * tool_mask).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without, per_token.sum(1), rtol=1e-5, atol=1e-5)
    masks_a_token = ((1 - tool_mask) * completion_mask).any(1)  # rows 0, 2, 3
    assert bool((with_tools != without)[masks_a_token].all()) and bool((with_tools == without)[~masks_a_token].all())


def test_config_validation(tmp_path):
    ok = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True)
    cfg = GVPOTrainerConfig(**ok)  # the defaults are GVPO's settings
    assert cfg.scale_rewards == "none" and cfg.beta == 0.0 and cfg.gvpo_reduction == "mean"
    assert GVPOTrainerConfig(**ok, scale_rewards=False).scale_rewards == "none"
    bad = [({"per_device_train_batch_size": 6, "gradient_accumulation_steps": 2}, "per_device_train_batch_size"),
           ({"gvpo_anchor": "stale"}, "gvpo_anchor"), ({"gvpo_reduction": "max"}, "gvpo_reduction"),
           ({"gvpo_beta": 0.0}, "gvpo_beta"), ({"beta": 0.04}, "beta"),
           ({"scale_rewards": "group"}, "scale_rewards"), ({"scale_rewards": True}, "scale_rewards"),
           ({"scale_rewards": "batch"}, "scale_rewards"),
           ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
           ({"num_generations_eval": 2}, "num_generations_eval"), ({"loss_type": "grpo"}, "loss_type"),
           ({"epsilon": 0.3}, "epsilon"), ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
           ({"entropy_coef": 0.01}, "entropy_coef"), ({"importance_sampling_level": "sequence"}, "importance"),
           ({"vllm_importance_sampling_correction": True}, "vllm_importance_sampling_correction"),
           ({"mask_truncated_completions": True}, "mask_truncated_completions"),
           ({"gvpo_anchor": "reference", "gvpo_log_kl_ref": False}, "gvpo_log_kl_ref"),
           ({"gvpo_log_kl_ref": "yes"}, "gvpo_log_kl_ref")]
    for change, name in bad:
        with pytest.raises(ValueError, match=name):
            GVPOTrainerConfig(**{**ok, **change})
    assert GVPOTrainerConfig(**ok, num_generations_eval=4).num_generations_eval == 4


def test_eval_micro_batches_hold_whole_groups(tmp_path, monkeypatch):
    # on 2 processes, TRL accepts a global eval batch of 2 × 2 = 4 = k, but each process would hold half a group
    monkeypatch.setattr(GVPOTrainerConfig, "world_size", property(lambda self: 2))
    ok = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
              eval_strategy="steps", eval_steps=1)
    assert GVPOTrainerConfig(**ok, per_device_eval_batch_size=4).per_device_eval_batch_size == 4
    with pytest.raises(ValueError, match="per_device_eval_batch_size"):
        GVPOTrainerConfig(**ok, per_device_eval_batch_size=2)


def test_ref_model_only_where_a_reference_is_used(tmp_path):
    model, tok, data = _setup(n_prompts=4)
    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=1, gvpo_log_kl_ref=False)
    with pytest.raises(ValueError, match="ref_model"):
        GVPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok,
                    ref_model=copy.deepcopy(model))
    assert GVPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data,
                       processing_class=tok).gvpo_ref_model is None  # "old" anchor, no KL metric: no reference
    ref = copy.deepcopy(model)
    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=1)  # the KL metric's
    trainer = GVPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok,
                          ref_model=ref)
    assert trainer.gvpo_ref_model is ref


def test_reference_takes_the_policys_quantization(tmp_path, monkeypatch):
    model, tok, data = _setup(n_prompts=4)
    loaded = []

    def load(path, **kwargs):  # records how the reference is loaded (bitsandbytes needs a GPU)
        loaded.append((path, kwargs))
        return copy.deepcopy(model)

    monkeypatch.setattr(trl_gvpo, "create_model_from_path", load)
    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=1, gvpo_anchor="reference")
    given, own = object(), object()
    GVPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok,
                quantization_config=given)  # TRL ignores it for a loaded policy, but it is the user's choice
    model.config.quantization_config = own  # a policy loaded quantized carries its config
    GVPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok)
    assert [path for path, _ in loaded] == [model.config._name_or_path] * 2
    assert loaded[0][1]["quantization_config"] is given and loaded[1][1]["quantization_config"] is own


def _none_for_one(completions, **kwargs):
    return [None] + [0.5] * (len(completions) - 1)


def _infinite(completions, **kwargs):
    return [float("inf")] * len(completions)


@pytest.mark.parametrize("funcs,match", [([_none_for_one], r"every reward function \(\['_none_for_one'\]\)"),
                                         ([_spread_reward, _infinite], r"\['_infinite'\] returned ±inf")])
def test_completion_without_a_finite_reward_raises(tmp_path, funcs, match):
    model, tok, data = _setup(n_prompts=4)
    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=1)
    trainer = GVPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_none_from_one_of_several_reward_functions_is_allowed(tmp_path):
    # TRL's meaning of None from one of several functions: it does not apply, the others' sum is the reward
    model, tok, data = _setup(n_prompts=4)
    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=1)
    trainer = GVPOTrainer(model=model, reward_funcs=[_spread_reward, _none_for_one], args=args, train_dataset=data,
                          processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1


def test_authors_config(tmp_path):
    cfg = trl_gvpo.authors_config(str(tmp_path), use_cpu=True, max_completion_length=512)
    assert isinstance(cfg, GVPOTrainerConfig) and cfg.max_completion_length == 512
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.weight_decay) == (1e-6, "constant", 0.01)
    assert cfg.max_grad_norm == 1.0
    assert (cfg.num_generations, cfg.gvpo_beta, cfg.gvpo_anchor, cfg.gvpo_reduction) == (4, 0.1, "old", "sum")
    # on 8 processes: 16 × 8 accumulated × 8 = 1024 completions (256 prompts) per step, 4 steps per rollout
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.steps_per_generation) == (16, 8, 32)
    assert cfg.num_iterations == 1 and cfg.beta == 0.0 and cfg.scale_rewards == "none"
    two = trl_gvpo.authors_config(str(tmp_path), num_processes=2, per_device_train_batch_size=8, use_cpu=True)
    assert (two.gradient_accumulation_steps, two.steps_per_generation) == (64, 256)
    with pytest.raises(ValueError, match="learning_rate"):
        trl_gvpo.authors_config(str(tmp_path), learning_rate=1e-5)
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        trl_gvpo.authors_config(str(tmp_path), per_device_train_batch_size=12)
    with pytest.raises(TypeError, match="num_processes"):
        trl_gvpo.authors_config(str(tmp_path), num_processes=2.0)


def test_changed_trl_api_fails_loudly(monkeypatch):
    trl_gvpo.check_trl_api()  # the installed TRL passes
    with monkeypatch.context() as m:
        m.delattr(trl.GRPOTrainer, "_get_per_token_logps_and_entropies")
        with pytest.raises(RuntimeError, match=rf"trl {trl.__version__}.*_get_per_token_logps_and_entropies"):
            trl_gvpo.check_trl_api()
        with pytest.raises(RuntimeError, match=trl.__version__):  # before any work, whatever the arguments
            GVPOTrainer(model=None, reward_funcs=None)
    with monkeypatch.context() as m:
        m.setattr(trl.GRPOTrainer, "_compute_loss", lambda self, inputs: None)
        with pytest.raises(RuntimeError, match="_compute_loss"):
            trl_gvpo.check_trl_api()
    with pytest.raises(RuntimeError, match="_buffered_inputs"):
        trl_gvpo.check_trl_api(type("Trainer", (), {"_step": 0})())
