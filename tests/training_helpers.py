"""Tiny LLaVA-format data, processor and model for the training tests; also a script for subprocess tests.

- `python -m torch.distributed.run --nproc_per_node=2 tests/training_helpers.py distributed OUT`: the ranks train
  the same tiny model data-parallel and each writes `OUT/rank-<r>.json` with the hash of its final parameters, the
  losses it logged, its step count, the world size and the indices of the samples it was given.
- `python tests/training_helpers.py kill-during-save OUT`: trains with a checkpoint every 2 steps and kills itself
  (SIGKILL) halfway through writing the `trainer_state.json` of `checkpoint-4`.
"""

import dataclasses
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


sys.path.insert(0, str(Path(__file__).parent))

from model_helpers import tiny_model_for_processor  # noqa: E402
from processing_helpers import make_tiny_processor  # noqa: E402


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def tiny_processor():
    """A tiny processor matching `tiny_model_for_processor`: 84 px crops, 4 image tokens per crop."""
    return make_tiny_processor(image_size=84, num_image_tokens_per_crop=4)


def tiny_training_model(processor, seed: int = 0):
    """A tiny random FlashSloth model for `processor`, with SAP dropout off so that runs are comparable."""
    model = tiny_model_for_processor(processor, seed=seed)
    model.config.pooling_dropout = 0.0
    model.model.spatial_pooling.dropout.p = 0.0
    return model


def colour_image(colour: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A square of one colour with a little noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def llava_records(num_samples: int = 8, image_folder: Path | None = None, text_only_every: int = 4) -> list[dict]:
    """
    LLaVA records asking the colour of an image (answer: the colour), every `text_only_every`-th one text-only and
    every third one with a second turn. Images are saved as PNGs into `image_folder` when given (records then hold
    file names), else kept in memory.
    """
    records = []
    colours = list(COLOURS)
    for index in range(num_samples):
        colour = colours[index % len(colours)]
        if text_only_every and index % text_only_every == text_only_every - 1:
            records.append(
                {
                    "id": f"text-{index}",
                    "conversations": [
                        {"from": "human", "value": "Say the name of a colour."},
                        {"from": "gpt", "value": colour},
                    ],
                }
            )
            continue
        conversations = [
            {"from": "human", "value": "<image>\nWhat is the color?"},
            {"from": "gpt", "value": colour},
        ]
        if index % 3 == 2:
            conversations += [
                {"from": "human", "value": "Is it red?"},
                {"from": "gpt", "value": "yes" if colour == "red" else "no"},
            ]
        image = colour_image(colour, seed=index)
        if image_folder is not None:
            name = f"image-{index}.png"
            image.save(image_folder / name)
            image = name
        records.append({"id": f"sample-{index}", "image": image, "conversations": conversations})
    return records


def write_llava_json(folder: Path, num_samples: int = 8, **kwargs) -> Path:
    """Write `data.json` and its images into `folder`; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    records = llava_records(num_samples, image_folder=folder / "images", **kwargs)
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def parameter_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


# Training arguments of the in-process runs: tiny, fast, deterministic.
TRAIN_ARGUMENTS = dict(
    per_device_train_batch_size=4,
    learning_rate=5e-3,
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
)

# Training arguments of the subprocess runs: tiny, fast, deterministic, one CPU thread per process (on the CPU: the
# FlashSloth default `use_cpu` on a machine without accelerator is what makes torchrun's processes one DDP group).
SUBPROCESS_ARGUMENTS = dict(
    per_device_train_batch_size=2,
    learning_rate=3e-3,
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
    lr_scheduler_type="constant",
)


def _distributed_main(output_dir: Path):
    from transformers import TrainerCallback

    from flashsloth.training.data import LlavaDataset
    from flashsloth.training.trainer import train

    processor = tiny_processor()
    model = tiny_training_model(processor)

    class RecordingDataset(LlavaDataset):
        """Remembers which samples this process was given."""

        seen = []

        def __getitem__(self, index):
            self.seen.append(index)
            return super().__getitem__(index)

    class RecordRank(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            result = {
                "hash": parameter_hash(model),
                "losses": logged_losses(state.log_history),
                "step": state.global_step,
                "world_size": args.world_size,
                "samples": RecordingDataset.seen,
            }
            (output_dir / f"rank-{args.process_index}.json").write_text(json.dumps(result))

    train(
        model,
        processor,
        RecordingDataset(llava_records(8)),
        output_dir / "run",
        stage=2,
        callbacks=[RecordRank()],
        max_steps=6,
        save_strategy="no",
        ddp_backend="gloo",
        **SUBPROCESS_ARGUMENTS,
    )


def _kill_during_save_main(output_dir: Path):
    from transformers.trainer_callback import TrainerState

    from flashsloth.training.data import LlavaDataset
    from flashsloth.training.trainer import train

    def save_to_json_then_die(state, json_path):
        text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True)
        if state.global_step == 4:  # die halfway through writing checkpoint-4's state, as a kill -9 would
            with open(json_path, "w", encoding="utf-8") as file:
                file.write(text[: len(text) // 2])
                file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        original_save_to_json(state, json_path)

    original_save_to_json = TrainerState.save_to_json
    TrainerState.save_to_json = save_to_json_then_die
    processor = tiny_processor()
    train(
        tiny_training_model(processor),
        processor,
        LlavaDataset(llava_records(8)),
        output_dir,
        stage=1,
        max_steps=6,
        save_steps=2,
        **SUBPROCESS_ARGUMENTS,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"distributed": _distributed_main, "kill-during-save": _kill_during_save_main}[sys.argv[1]](Path(sys.argv[2]))
