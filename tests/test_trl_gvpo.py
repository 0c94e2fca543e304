"""GVPO through TRL's GRPOTrainer: the loss equals refimpl.gvpo.gvpo_loss on the same batch."""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import refimpl  # noqa: E402
from refimpl import lm  # noqa: E402
from refimpl.gvpo import gvpo_loss  # noqa: E402
from refimpl.trl_gvpo import GVPOTrainer, GVPOTrainerConfig  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def _reward(completions, target, **kwargs):
    return arith.reward([c.split(arith.STOP)[0] for c in completions], target).tolist()


class _Recording(GVPOTrainer):
    """Records, at every loss evaluation, TRL's loss and refimpl's on the same tensors."""

    seen: list

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        k = self.num_generations
        logp, _ = lm.sequence_logprobs(model, inputs["prompt_ids"], inputs["prompt_mask"],
                                       inputs["completion_ids"], inputs["completion_mask"])
        ours = gvpo_loss(logp.view(-1, k), inputs["gvpo_logp_anchor"].view(-1, k),
                         inputs["advantages"].view(-1, k), self.args.gvpo_beta)
        groups = inputs["prompt_ids"].view(-1, k, inputs["prompt_ids"].shape[1])
        self.seen.append((loss.item(), ours.item(), bool((groups == groups[:, :1]).all()),
                          inputs["advantages"].view(-1, k).sum(1).abs().max().item()))
        return loss


@pytest.mark.parametrize("anchor", ["old", "reference"])
def test_trl_gvpo_loss_matches_refimpl(tmp_path, anchor):
    refimpl.config.quiet()
    model, tok = refimpl.load_model("refimpl/toy-arith", device="cpu")
    tok.eos_token = arith.STOP  # TRL stops and masks at the tokenizer's eos
    before = [p.detach().clone() for p in model.parameters()]
    texts, targets = arith.prompts("train")
    data = datasets.Dataset.from_dict({"prompt": texts[:16], "target": targets[:16]})
    args = GVPOTrainerConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, steps_per_generation=2,
        gradient_accumulation_steps=2, max_completion_length=6, max_steps=2, learning_rate=1e-3,
        num_iterations=2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        gvpo_beta=0.1, gvpo_anchor=anchor, disable_tqdm=True,
    )
    trainer = _Recording(model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=tok)
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) >= 4
    for trl_loss, ours, whole_groups, centred in trainer.seen:
        assert whole_groups and centred < 1e-5  # groups intact, rewards centred, not std-scaled
        assert abs(trl_loss - ours) <= 1e-5 * max(1.0, abs(ours))
    assert max(ours for _, ours, *_ in trainer.seen) > 0  # the second iteration moves away from the anchor
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        GVPOTrainerConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=4, use_cpu=True)
    with pytest.raises(ValueError, match="gvpo_anchor"):
        GVPOTrainerConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                          gvpo_anchor="stale", use_cpu=True)
    cfg = GVPOTrainerConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True)
    assert cfg.scale_rewards == "none" and cfg.beta == 0.0
