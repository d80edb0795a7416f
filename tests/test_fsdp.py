"""
FSDP on 2 CPU processes (gloo): FlashSloth fully sharded layer by layer (the classes of `_no_split_modules`: decoder
layers, vision encoder layers, SAP, EmbQ) trains with the losses and weights of a one-process run on the same batches.

accelerate runs FSDP only on GPUs (on CPU processes its state is MULTI_CPU and the FSDP plugin is ignored, see
docs/fsdp.md), so the test shards with torch's `fully_shard` (FSDP2, what accelerate's `fsdp_version: 2` calls) and
the wrap rule accelerate's `TRANSFORMER_BASED_WRAP` applies.

Also a script: `python -m torch.distributed.run --nproc_per_node=2 tests/test_fsdp.py OUT` writes `OUT/rank-<r>.json`
(losses, wrapped classes, world size, the hash of the gathered weights).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))

from training_helpers import llava_records, tiny_processor, tiny_training_model  # noqa: E402


STEPS = 4
GLOBAL_BATCH = 4
LEARNING_RATE = 0.1


def batches(processor, world_size: int, rank: int):
    """The samples of each step, `GLOBAL_BATCH` of the 8 records in order, this rank's share of them."""
    from flashsloth.training.data import FlashSlothDataCollator, LlavaDataset

    dataset, collate = LlavaDataset(llava_records(8)), FlashSlothDataCollator(processor)
    per_rank = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        first = (step * GLOBAL_BATCH) % len(dataset) + rank * per_rank
        yield collate([dataset[index] for index in range(first, first + per_rank)])


def train(model, processor, world_size: int = 1, rank: int = 0) -> list[float]:
    """
    SGD steps on the stage-2 parameters; each step's loss is the mean over the global batch's answer tokens. (Adam
    would turn the rounding noise in gradients that are 0 in exact arithmetic, such as the key biases', whose shift
    the softmax ignores, into full-size steps, and the two runs' weights would differ there.)
    """
    from flashsloth.training.stages import configure_trainable

    configure_trainable(model, stage=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    losses = []
    model.train()
    for batch in batches(processor, world_size, rank):
        tokens = (batch["labels"][:, 1:] != -100).sum()
        if world_size > 1:
            dist.all_reduce(tokens)
        # Summed over this rank's tokens, divided by the global count: FSDP averages the gradients over the ranks, so
        # the world size puts back the sum.
        loss = model(**batch, num_items_in_batch=tokens).loss * world_size
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_loss = loss.detach() / world_size
        if world_size > 1:
            dist.all_reduce(step_loss)
        losses.append(step_loss.item())
    return losses


def _worker(output_dir: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_training_model(processor)
    wrap = set(model._no_split_modules)  # the rule of accelerate's TRANSFORMER_BASED_WRAP without a class list
    wrapped = sorted({type(module).__name__ for module in model.modules() if type(module).__name__ in wrap})
    for module in [module for module in model.modules() if type(module).__name__ in wrap]:
        fully_shard(module)
    fully_shard(model)
    losses = train(model, processor, world_size, rank)
    sharded = {name: p.to_local().numel() for name, p in model.named_parameters()}
    full = {name: p.full_tensor() for name, p in model.named_parameters()}  # gathered from the shards
    result = {
        "losses": losses,
        "world_size": world_size,
        "wrapped": wrapped,
        "fsdp_classes": sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")}),
        "local_fraction": sum(sharded.values()) / sum(tensor.numel() for tensor in full.values()),
    }
    if rank == 0:
        torch.save(full, output_dir / "weights.pt")
    (output_dir / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp_on_two_cpu_processes_matches_one_process_training(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(Path(__file__)),
        str(tmp_path),
    ]  # fmt: skip
    # A session of its own, so that a hung run is killed with its worker processes.
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["losses"] == ranks[1]["losses"]
    for layer in ("PhiDecoderLayer", "SiglipEncoderLayer", "FlashSlothEmbeddedQuery"):
        assert layer in ranks[0]["wrapped"] and f"FSDP{layer}" in ranks[0]["fsdp_classes"], ranks[0]
    assert all(0.4 < rank["local_fraction"] < 0.6 for rank in ranks), ranks  # each rank holds about half

    torch.manual_seed(0)
    processor = tiny_processor()
    model = tiny_training_model(processor)
    reference = train(model, processor)
    assert reference[-1] < reference[0], reference
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference), rtol=1e-4, atol=1e-5)
    gathered = torch.load(tmp_path / "weights.pt", weights_only=True)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gathered[name], parameter.detach(), rtol=1e-4, atol=1e-6, msg=name)
    assert gathered.keys() == dict(model.named_parameters()).keys()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
