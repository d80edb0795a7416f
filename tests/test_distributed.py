"""The same training under torch.distributed with 2 CPU processes (gloo, DDP): the ranks stay in sync."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed


TESTS_DIR = Path(__file__).parent


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)
def test_two_processes_end_with_identical_weights_and_a_lower_loss(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port for the rendezvous
        "--nproc_per_node=2",
        str(TESTS_DIR / "training_helpers.py"),
        "distributed",
        str(tmp_path),
    ]
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
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    # Each rank was given its own half of every epoch (8 samples, 2 per rank and step: an epoch is 2 steps)...
    first_epoch = [set(rank["samples"][:4]) for rank in ranks]
    assert first_epoch[0].isdisjoint(first_epoch[1]) and first_epoch[0] | first_epoch[1] == set(range(8)), ranks
    # ...and yet both end with the same weights: DDP averaged the gradients of both halves into both replicas.
    assert ranks[0]["hash"] == ranks[1]["hash"]
    losses = ranks[0]["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    # Rank 0 alone wrote the final model.
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
