"""GVPO on TRL in two processes: one optimizer step of 2 processes × one group each (DDP over gloo, on
the CPU) equals one step of one process accumulating the same two groups, every process holds whole
groups, and the two replicas stay identical.

The test launches this file with ``accelerate launch --multi_gpu --num_processes 2`` (accelerate's
torchrun launcher; with ``use_cpu=True`` each process joins a gloo group: ``accelerate launch --cpu``
starts a single process unless it goes through mpirun) and compares with the same run in one process.
"""
import copy
import importlib
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch


def _optional(module: str):
    """Import an optional dependency, or skip; under ``REFIMPL_REQUIRE_OPTIONAL=1`` (``dev.py test``
    and ``dev.py lowest``, which install it) a failed import is an error, never a silent skip."""
    if os.environ.get("REFIMPL_REQUIRE_OPTIONAL") == "1" or __name__ == "__main__":
        return importlib.import_module(module)
    return pytest.importorskip(module)


_optional("accelerate")
_optional("trl")
datasets = _optional("datasets")

import refimpl  # noqa: E402
from refimpl.trl_gvpo import GVPOTrainer, GVPOTrainerConfig  # noqa: E402
from refimpl.worlds import arith  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 4  # completions per prompt; one group per process (2 processes) or per micro-batch (1 process)


def _spread_reward(completions, **kwargs):
    """A deterministic reward that differs between most distinct completions."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


def _unpadded(ids: list[int]) -> tuple:
    """A completion without the zeros after its stop (the padding width depends on the batch it was generated in)."""
    while ids and ids[-1] == 0:
        ids = ids[:-1]
    return tuple(ids)


class _Deterministic(GVPOTrainer):
    """Samples each group under a seed taken from its prompt, so that the completions do not depend on
    which process or micro-batch holds the group; records the groups each micro-batch holds."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        completion_ids = []
        for i in range(0, len(prompt_ids), K):
            group = [list(p) for p in prompt_ids[i:i + K]]
            assert all(p == group[0] for p in group), "a process's generation batch splits a group"
            with torch.random.fork_rng():
                torch.manual_seed(zlib.crc32(str(group[0]).encode()))
                ids, _ = super()._generate_single_turn(group, images, multimodal_fields, num_generations,
                                                       has_tool_images)
            completion_ids += ids
        return completion_ids, None

    def _compute_loss(self, model, inputs):
        prompts = inputs["prompt_ids"].view(-1, K, inputs["prompt_ids"].shape[1])  # [groups, k, P]
        completions = inputs["completion_ids"] * inputs["completion_mask"]
        completions = completions.view(-1, K, completions.shape[1])  # [groups, k, T], 0 after the stop
        for p, c in zip(prompts.tolist(), completions.tolist()):
            self.groups.append((sorted(set(map(tuple, p))), sorted(map(_unpadded, c))))
        return super()._compute_loss(model, inputs)


def _train(output_dir, accumulation: int):
    """(parameter update, [(prompts of a group, its completions)], accelerator) of one SGD step on 2 groups."""
    refimpl.config.quiet()
    torch.set_num_threads(1)
    model, tok = refimpl.load_model("refimpl/toy-arith", device="cpu")
    tok.eos_token = arith.STOP  # TRL stops and masks at the tokenizer's eos
    texts, targets = arith.prompts("train")
    data = datasets.Dataset.from_dict({"prompt": texts[:8], "target": targets[:8]})
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference away from the policy: rho != 0, so the groups' mean rho enters the update
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    before = [p.detach().clone() for p in model.parameters()]
    # 8 completions per step either way: 2 processes × 4 × 1 accumulated, or 1 × 4 × 2 accumulated
    args = GVPOTrainerConfig(output_dir=str(output_dir), per_device_train_batch_size=K, num_generations=K,
                             gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                             max_grad_norm=0.0, gvpo_anchor="reference", temperature=2.0, max_completion_length=6,
                             use_cpu=True, bf16=False, seed=0, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = _Deterministic(model=model, reward_funcs=_spread_reward, args=args, train_dataset=data,
                             processing_class=tok, ref_model=ref)
    trainer.groups = []
    trainer.train()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], trainer.groups, trainer.accelerator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_accumulating(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}  # not what an earlier test set
    env = {**clean, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), __file__, str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]  # a real two-process group
    for a, b in zip(ranks[0]["delta"], ranks[1]["delta"]):
        assert torch.equal(a, b)  # DDP keeps the replicas identical
    # the reference, one process accumulating two micro-batches, also in a fresh process: no state left over
    # from other tests (accelerate's process state is a singleton), the same threads and environment
    (tmp_path / "one").mkdir()
    single = subprocess.run([sys.executable, __file__, str(tmp_path / "one"), "2"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-4000:] + single.stderr[-4000:]
    single = torch.load(tmp_path / "one" / "rank0.pt")
    assert single["world"] == 1
    one, groups_one = single["delta"], single["groups"]
    # the same two groups, one per process, each whole (one prompt, its k completions)
    assert [len(r["groups"]) for r in ranks] == [1, 1]
    groups_two = [g for r in ranks for g in r["groups"]]
    assert all(len(prompts) == 1 for prompts, _ in groups_two + groups_one)
    assert sorted(groups_two) == sorted(groups_one) and groups_two[0][0] != groups_two[1][0]
    scale = max(d.abs().max().item() for d in one)
    assert scale > 1e-3  # rewards and rho differ within groups: a real update
    # float32: the runs add the same two per-group gradients (each halved) in an order that may differ
    # (accumulation on one process vs gloo's all-reduce, then / 2): a few ulps of the largest term, ~1e-7 of it
    # (bit-identical where measured); 1e-5 of the largest update leaves a margin of ~100 and still fails if a
    # group's term were lost, doubled or centred with the other group's statistics
    for a, b in zip(ranks[0]["delta"], one):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)


if __name__ == "__main__":  # one process of a launch above: FOLDER [ACCUMULATION]
    delta, groups, accelerator = _train(Path(sys.argv[1]) / "trainer", accumulation=int(sys.argv[2:3] and sys.argv[2] or 1))
    torch.save({"delta": delta, "groups": groups, "world": accelerator.num_processes},
               Path(sys.argv[1]) / f"rank{accelerator.process_index}.pt")
