"""Access to the parity fixtures made by running the original FlashSloth code (../shared/fixtures/parity)."""

import json
import os
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


SHARED_DIR = Path(os.environ.get("FLASHSLOTH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PARITY_DIR = SHARED_DIR / "fixtures" / "parity"
PHI2_TOKENIZER_DIR = SHARED_DIR / "tokenizers" / "phi-2"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures live beside the repository in ../shared")
    return path


def regenerate_original_state_dict(fixture_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny original-format weights, regenerated from `keys.json` with the fixture's seeded rule."""
    state_dict = {}
    for name, shape, kind in json.loads((fixture_dir / "keys.json").read_text()):
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        state_dict[name] = 1.0 + 0.1 * noise if kind == "layernorm_weight" else 0.02 * noise
    return state_dict


class ParityFixture:
    def __init__(self, name: str):
        self.name = name
        self.dir = require_shared(PARITY_DIR / name)
        self.reference = json.loads((self.dir / "reference.json").read_text())
        self.tensors = load_file(self.dir / "reference.safetensors")
        self.original_config = json.loads((self.dir / "original_config.json").read_text())
        self.vision_config = json.loads((self.dir / "vision_config.json").read_text())

    @property
    def num_crops(self) -> int:
        return self.tensors["pixel_values"].reshape(-1, 3, 384, 384).shape[0]

    def expanded_inputs(self, image_token_id: int = 50297, query_token_id: int = 50295, num_query_tokens: int = 9):
        """Model inputs built straight from the original ids: -200 -> the image block, 50295 -> the query block,
        and the instruction mask over the question span the original reads."""
        ids = []
        for token in self.reference["input_ids"]:
            if token == -200:
                ids += [image_token_id] * (81 * self.num_crops)
            elif token == 50295:
                ids += [query_token_id] * num_query_tokens
            else:
                ids.append(token)
        input_ids = torch.tensor([ids])
        positions = self.reference["positions"]
        instruction_mask = torch.zeros_like(input_ids)
        instruction_mask[0, positions["question_span_start"] : positions["question_span_end"]] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": self.tensors["pixel_values"].reshape(-1, 3, 384, 384),
            "image_num_crops": torch.tensor([self.num_crops]),
            "instruction_mask": instruction_mask,
        }
