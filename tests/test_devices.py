"""Tensors used together must share a device: every public function that combines several tensors
(or a model and tensors) checks it on entry and raises a ValueError naming both arguments.

Without a GPU the check is exercised with ``device="meta"`` tensors: they carry no data, so the
check must fire before anything reads a value. With a GPU, small end-to-end runs on CUDA too.
"""
import copy
import dataclasses

import pytest
import torch

from refimpl import bestofn, checks, constraints, dpo, frontier, grpo, gvpo, idle, kl, klest, klpg, lm, metrics, pools, qprobe
from refimpl import resample, rft, rl, smc, tabular
from refimpl.rl import RLConfig
from refimpl.worlds import arith

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def meta(x):
    """x on the meta device: a tensor, the tensors of a Samples, or a model."""
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, lm.Samples):
        return dataclasses.replace(x, **{f.name: getattr(x, f.name).to("meta") for f in dataclasses.fields(x)
                                         if isinstance(getattr(x, f.name), torch.Tensor)})
    return copy.deepcopy(x).to("meta")


# --- the helper ----------------------------------------------------------------------------------

def test_same_device_names_both_arguments_and_reads_no_data():
    a, b = torch.zeros(3), torch.zeros(3, device="meta")
    checks.same_device(a=a, b=torch.ones(2), c=None)  # one device; None is skipped
    with pytest.raises(ValueError, match=r"^a \(cpu\) and b \(meta\) must be on the same device$"):
        checks.same_device(a=a, b=b)
    with pytest.raises(ValueError, match=r"model \(cpu\) and x \(meta\)"):
        checks.same_device(model=torch.device("cpu"), x=b)  # a device stands for a model or a generator
    with pytest.raises(TypeError, match="b must be a torch.Tensor, got list"):
        checks.same_device(a=a, b=[1.0])
    checks.same_device(g=torch.device("cuda"), x=torch.device("cuda:0"))  # no index: any cuda device
    with pytest.raises(ValueError, match=r"cuda:0.*cuda:1"):
        checks.same_device(x=torch.device("cuda:0"), y=torch.device("cuda:1"))


# --- every public function that combines tensors ------------------------------------------------------

def _cases():
    """(id, build) with build(world, arith_model) -> (call, meta_name, other_name): call() must raise a
    ValueError naming the argument put on the meta device and the one it is compared with."""
    f = torch.randn(3, 4, dtype=torch.float64)
    r = torch.rand(3, 4, dtype=torch.float64)
    lp = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    tok = torch.randn(2, 4, 3)  # [P, k, T]
    mask = torch.ones(2, 4, 3)
    world = klest.sequence_world(vocab=2, length=2)

    def plain(fn, kwargs, name, other):
        return lambda w, a: (lambda: fn(**{**kwargs, name: meta(kwargs[name])}), name, other)

    cases = [
        ("kl.optimal_policy", plain(kl.optimal_policy, dict(logp_ref=lp, reward=r, beta=0.5), "reward", "logp_ref")),
        ("kl.log_partition", plain(kl.log_partition, dict(logp_ref=lp, reward=r, beta=0.5), "logp_ref", "reward")),
        ("kl.kl_divergence", plain(kl.kl_divergence, dict(logp=lp, logq=lp), "logq", "logp")),
        ("kl.regularized_objective", plain(kl.regularized_objective, dict(logp=lp, logp_ref=lp, reward=r, beta=0.5),
                                           "reward", "logp")),
        ("kl.total_variation", plain(kl.total_variation, dict(logp=lp, logq=lp), "logp", "logq")),
        ("resample.expected_value", plain(resample.expected_value, dict(scores=f, values=r, beta=0.5),
                                          "values", "scores")),
        ("resample.expected_value/scores", plain(resample.expected_value, dict(scores=f, values=r, beta=0.5),
                                                 "scores", "values")),
        ("resample.resampling_law", plain(resample.resampling_law, dict(log_proposal=lp, log_w=f, ks=[1, 2]),
                                          "log_w", "log_proposal")),
        ("metrics.paired_diff", plain(metrics.paired_diff, dict(a=f, b=r), "b", "a")),
        ("metrics.paired_diff/list", lambda w, a: (lambda: metrics.paired_diff(meta(f[:, 0]), [1.0, 2.0, 3.0]), "a", "b")),
        ("metrics.auc", plain(metrics.auc, dict(scores=torch.tensor([0.1, 0.9, 0.5]), labels=torch.tensor([0, 1, 1])),
                              "labels", "scores")),
        ("qprobe.mse_loss", plain(qprobe.mse_loss, dict(q=f, rewards=r), "rewards", "q")),
        ("qprobe.ce_loss", plain(qprobe.ce_loss, dict(q=f, rewards=r), "q", "rewards")),
        ("qprobe.pg_loss", plain(qprobe.pg_loss, dict(q=f, rewards=r), "rewards", "q")),
        ("qprobe.bt_loss", plain(qprobe.bt_loss, dict(q_chosen=f, q_rejected=r), "q_rejected", "q_chosen")),
        ("qprobe.hinge_loss", plain(qprobe.hinge_loss, dict(q_chosen=f, q_rejected=r), "q_chosen", "q_rejected")),
        ("qprobe.chunk_expected_reward", plain(qprobe.chunk_expected_reward, dict(q=f, rewards=r, k=2, beta=0.1),
                                               "rewards", "q")),
        ("gvpo.check_groups", plain(gvpo.check_groups, dict(logp=f, rewards=r), "rewards", "logp")),
        ("gvpo.gvpo_weights", plain(gvpo.gvpo_weights, dict(logp=f, logp_anchor=f, rewards=r, beta=0.1),
                                    "logp_anchor", "logp")),
        ("gvpo.gvpo_loss", plain(gvpo.gvpo_loss, dict(logp=f, logp_anchor=f, rewards=r, beta=0.1), "rewards", "logp")),
        ("gvpo.gvpo_loss_terms", plain(gvpo.gvpo_loss_terms, dict(logp=f, logp_anchor=f, rewards=r, beta=0.1),
                                       "rewards", "logp")),
        ("grpo.grpo_loss", plain(grpo.grpo_loss, dict(logp_tok=tok, logp_old_tok=tok, mask=mask, rewards=f[:2].float()),
                                 "rewards", "logp_tok")),
        ("grpo.grpo_loss/ref", plain(grpo.grpo_loss, dict(logp_tok=tok, logp_old_tok=tok, mask=mask,
                                                          rewards=f[:2].float(), kl_coef=0.1, logp_ref_tok=tok),
                                     "logp_ref_tok", "logp_tok")),
        ("grpo.dr_grpo_loss", plain(grpo.dr_grpo_loss, dict(logp_tok=tok, logp_old_tok=tok, mask=mask,
                                                            rewards=f[:2].float()), "mask", "logp_tok")),
        ("klpg.kl_estimators", plain(klpg.kl_estimators, dict(logp=lp, logp_ref=f), "logp_ref", "logp")),
        ("klpg.kl_pg_loss", plain(klpg.kl_pg_loss, dict(logp=lp, logp_ref=f, rewards=r, beta=0.1), "rewards", "logp")),
        ("klpg.expected_gradient", plain(klpg.expected_gradient, dict(logits=f, logp_ref=lp, reward=r, beta=0.1,
                                                                      estimator="k2_loss"), "reward", "logits")),
        ("klpg.forward_kl_optimum", plain(klpg.forward_kl_optimum, dict(logp_ref=lp, reward=r, beta=0.5),
                                          "reward", "logp_ref")),
        ("tabular.train_tabular", plain(tabular.train_tabular, dict(logp_ref=lp, reward=r, config=RLConfig(
            loss="kl_pg", beta=0.5, k=2, steps=2, lr=1.0)), "reward", "logp_ref")),
        ("dpo.dpo_loss", plain(dpo.dpo_loss, dict(logp_chosen=f[0], logp_rejected=f[1], logp_ref_chosen=f[2],
                                                  logp_ref_rejected=lp[0], beta=0.1), "logp_ref_rejected", "logp_chosen")),
        ("dpo.preference_pairs", plain(dpo.preference_pairs, dict(logp_ref=lp, reward=r, n_pairs=4), "reward", "logp_ref")),
        ("dpo.preference_table", plain(dpo.preference_table, dict(logp_ref=lp, reward=r, logp_data=lp),
                                       "logp_data", "logp_ref")),
        ("dpo.pair_table", lambda w, a: (lambda: dpo.pair_table(dpo.Pairs(torch.tensor([[0, 1]]), meta(torch.tensor([[2, 1]]))),
                                                                4), "pairs.rejected", "pairs.chosen")),
        ("dpo.dpo_population_loss", plain(dpo.dpo_population_loss, dict(logp=lp, logp_ref=lp, reward=r, beta=0.5),
                                          "logp", "logp_ref")),
        ("dpo.train_dpo_tabular", plain(dpo.train_dpo_tabular, dict(logp_ref=lp, pairs=dpo.preference_table(lp, r),
                                                                    beta=0.5, steps=2, lr=1.0), "pairs", "logp_ref")),
        ("bestofn.best_of_n_law", plain(bestofn.best_of_n_law, dict(logp=lp, scores=r, n=3), "scores", "logp")),
        ("bestofn.rejection_acceptance", plain(bestofn.rejection_acceptance, dict(logp_ref=lp, reward=r, beta=0.5, r_max=1.0),
                                               "reward", "logp_ref")),
        ("bestofn.rejection_law", plain(bestofn.rejection_law, dict(logp_ref=lp, reward=r, beta=0.5,
                                                                    r_max=torch.ones(3, dtype=torch.float64), n=3),
                                        "r_max", "reward")),
        ("bestofn.rejection_sample", plain(bestofn.rejection_sample, dict(logp_ref=lp, reward=r, beta=0.5, r_max=1.0, n=5),
                                           "logp_ref", "reward")),
        ("smc.soft_values", plain(smc.soft_values, dict(logp=lp, reward=r, beta=0.5, vocab_size=2), "reward", "logp")),
        ("smc.guided_law", lambda w, a: (lambda: smc.guided_law(lp, [meta(p) if i == 1 else p for i, p in enumerate(
            smc.soft_values(lp, r, 0.5, 2))], 2), "log_psi[1]", "logp")),
        ("arith.preference_label", plain(arith.preference_label, dict(score_a=f[0], score_b=f[1]), "score_b", "score_a")),
        ("klest.kl_penalty", plain(klest.kl_penalty, dict(logp=lp, logp_ref=f, penalty="k2", logp_old=lp), "logp_old", "logp")),
        ("klest.penalized_pg_loss", plain(klest.penalized_pg_loss, dict(logp_tok=tok, ref_tok=tok, mask=mask,
                                                                        rewards=f[:2].float(), beta=0.1, estimator="k2_loss"),
                                          "rewards", "logp_tok")),
        ("klest.token_logp", plain(klest.token_logp, dict(world=world, logits=world.logp_ref), "logits", "world")),
        ("klest.expected_gradient", plain(klest.expected_gradient, dict(world=world, logits=world.logp_ref, beta=0.5,
                                                                        estimator="k2_loss"), "logits", "world")),
        ("klest.fixed_point/world", lambda w, a: (lambda: klest.fixed_point(world._replace(reward=meta(world.reward)), 0.5),
                                                  "world.reward", "world.logp_ref")),
        ("frontier.reward_kl", plain(frontier.reward_kl, dict(path=torch.stack([lp, lp]), logp_ref=lp, reward=r),
                                     "path", "logp_ref")),
        ("frontier.reward_kl/list", lambda w, a: (lambda: frontier.reward_kl([lp, meta(lp)], lp, r), "path[1]", "logp_ref")),
        ("frontier.frontier", plain(frontier.frontier, dict(logp_ref=lp, reward=r, betas=[0.5]), "reward", "logp_ref")),
        ("frontier.frontier_kl", plain(frontier.frontier_kl, dict(logp_ref=lp, reward=r, target=torch.tensor([0.1])),
                                       "target", "logp_ref")),
        ("frontier.mirror_path", plain(frontier.mirror_path, dict(logp_ref=lp, reward=r, beta=0.5, step_beta=1.0, steps=2),
                                       "reward", "logp_ref")),
        ("frontier.expected_path", plain(frontier.expected_path, dict(logp_ref=lp, reward=r, beta=0.5, lr=1.0, steps=2),
                                         "logp_ref", "reward")),
    ]

    # functions of a model and tensors: the tensors must be on the model's device
    def lm_case(fn, name, other="model"):
        def build(w, a):
            ids, mask_ = w.prompt_batch()
            c = w.completion_ids[:16]
            args = dict(prompt_ids=ids, prompt_mask=mask_, completion_ids=c, completion_mask=torch.ones_like(c))
            model = w.model
            if name == "model":
                model = meta(model)
            else:
                args[name] = meta(args[name])
            return (lambda: fn(model, **args)), name, other
        return build

    def samples(w):
        return lm.sample(w.model, w.tokenizer, w.prompts[:2], k=2, max_new_tokens=3, seed=0)

    cases += [
        ("lm.forward", lm_case(lm.forward, "completion_mask")),
        ("lm.forward/model", lm_case(lm.forward, "model", "prompt_ids")),
        ("lm.sequence_logprobs", lm_case(lm.sequence_logprobs, "prompt_ids")),
        ("lm.embed", lm_case(lm.embed, "completion_ids")),
        ("lm.embed_layers", lm_case(lm.embed_layers, "prompt_mask")),
        ("idle.log_allowed_mass", lm_case(lambda m, **kw: idle.log_allowed_mass(m, **kw, banned_ids=[1]), "completion_ids")),
        ("lm.left_align", lambda w, a: (lambda: lm.left_align(w.prompt_batch()[0], meta(w.prompt_batch()[1])), "mask", "ids")),
        ("exact.ExactWorld.logp", lambda w, a: (lambda: w.logp(meta(w.model)), "model", "prompt_ids")),
        ("arith.verdict_probability", lambda w, a: (lambda: arith.verdict_probability(
            a[0], a[1], *(lambda s: (s.prompt_ids, s.prompt_mask, s.completion_ids, meta(s.completion_mask)))(
                lm.sample(a[0], a[1], ["1 2 + 3 4 ="], k=2, max_new_tokens=4))), "completion_mask", "model")),
        ("constraints.violations", lambda w, a: (lambda: constraints.violations(
            [1], w.prompt_batch()[0][:2], w.completion_ids[:2], meta(torch.ones_like(w.completion_ids[:2])), 5),
            "completion_mask", "prompt_ids")),
        ("constraints.iter_banned", lambda w, a: (lambda: list(constraints.iter_banned(
            constraints.BannedTokens([1]), w.prompt_batch()[0][:2], meta(w.completion_ids[:2]), 5)),
            "completion_ids", "prompt_ids")),
        ("lm.Samples", lambda w, a: (lambda: dataclasses.replace(
            samples(w), completion_mask=meta(samples(w).completion_mask)), "completion_mask", "completion_ids")),
        ("pools.Pool", lambda w, a: (lambda: pools.Pool(samples(w), meta(torch.zeros(2, 2)), torch.zeros(2, 2, 3)),
                                     "rewards", "samples")),
        ("rft.finetune_on_successes", lambda w, a: (lambda: rft.finetune_on_successes(
            copy.deepcopy(w.model), meta(samples(w)), torch.ones(4)), "prompt_ids", "model")),
        ("rft.finetune_dpo", lambda w, a: (lambda: rft.finetune_dpo(
            copy.deepcopy(w.model), w.model, meta(samples(w)), torch.tensor([0]), torch.tensor([1]), 0.1, 1),
            "samples", "policy")),
        ("rl.train", lambda w, a: (lambda: rl.train(copy.deepcopy(w.model), meta(w.model), w.tokenizer, w.prompts,
                                                    list(range(len(w.prompts))), lambda t, y: torch.zeros(len(t)),
                                                    RLConfig(steps=1, prompts_per_step=2, max_new_tokens=3)),
                                   "ref", "policy")),
        ("rl.rollout_batch", lambda w, a: (lambda: rl.rollout_batch(meta(w.model), w.model, w.tokenizer, w.prompts,
                                                                    list(range(len(w.prompts))),
                                                                    lambda t, y: torch.zeros(len(t)),
                                                                    RLConfig(prompts_per_step=2, max_new_tokens=3)),
                                           "policy", "ref")),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("build", [b for _, b in CASES], ids=[i for i, _ in CASES])
def test_tensors_on_two_devices_give_a_clear_error(build, exact_world, arith_model, one_thread):
    call, name, other = build(exact_world, arith_model)
    with pytest.raises(ValueError, match="must be on the same device") as err:
        call()
    msg = str(err.value)
    assert f"{name} (meta)" in msg and f"{other} (cpu)" in msg, msg


def test_every_changed_module_is_covered():
    covered = {i.split(".")[0].split("/")[0] for i, _ in CASES}
    assert {"kl", "resample", "metrics", "qprobe", "gvpo", "grpo", "klpg", "tabular", "dpo", "bestofn", "smc",
            "lm", "idle", "constraints", "pools", "rft", "rl", "arith", "exact", "klest", "frontier"} <= covered


# --- on a GPU ------------------------------------------------------------------------------------------

@CUDA
def test_chunk_expected_reward_on_cuda():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(4, 12, generator=g), (torch.rand(4, 12, generator=g) < 0.4).float()
    on_gpu = qprobe.chunk_expected_reward(q.cuda(), r.cuda(), 4, 0.1)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), qprobe.chunk_expected_reward(q, r, 4, 0.1))
    with pytest.raises(ValueError, match=r"q \(cuda:0\) and rewards \(cpu\) must be on the same device"):
        qprobe.chunk_expected_reward(q.cuda(), r, 4, 0.1)


@CUDA
def test_a_pool_collected_on_cuda_lives_on_cuda_and_can_be_scored(arith_model):
    model, tok = copy.deepcopy(arith_model[0]).cuda(), arith_model[1]
    x, t = arith.prompts("test", n=4)
    pool = pools.collect(model, tok, x, t, arith.reward, k=8, max_new_tokens=arith.MAX_NEW_TOKENS)
    assert {pool.samples.device.type, pool.rewards.device.type, pool.features.device.type} == {"cuda"}
    fit = qprobe.train_probe(pool.features, pool.rewards, loss="mse", epochs=2)
    with torch.no_grad():
        q = fit.probe(pool.features)
    assert qprobe.chunk_expected_reward(q, pool.rewards, 4, 0.1).shape == (4,)
    r = arith.reward(pool.texts, pool.samples.expand(t), device=pool.samples.device)
    assert r.device == pool.rewards.device and torch.equal(r.view(4, 8), pool.rewards)
