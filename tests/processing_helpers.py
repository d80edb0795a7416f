"""Helpers for the processing tests (and tiny model tests): data paths, a tiny tokenizer, fixture loading."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from flashsloth.demo import train_demo_tokenizer
from flashsloth.processing import build_processor
from parity_helpers import PARITY_DIR, PHI2_TOKENIZER_DIR, SHARED_DIR, require_shared  # noqa: F401 (re-exported)


PROCESSOR_FIXTURES_DIR = SHARED_DIR / "fixtures" / "processor"
PARITY_FIXTURES_DIR = PARITY_DIR

TINY_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is the color of the large square in the picture? ASSISTANT: It is red.",
    "USER: How many cats are there? ASSISTANT: There are two cats on the sofa.",
    "Describe the image in detail. The picture shows a dog running in a park.",
    "What is written on the sign? The sign says stop.",
]


def make_tiny_tokenizer(vocab_size: int = 320, model_max_length: int = 2048):
    """
    A small byte-level BPE tokenizer (Phi-2 style, no prefix space) with the FlashSloth tokens added: the demo
    model's tokenizer recipe on a few sentences.

    Ids: `<|endoftext|>` is 0 (eos, bos, unk and pad), then the 256 byte tokens and the learned merges, then
    `<learnable>`, `</s>`, `<image>` as the last three ids; `len(tokenizer) <= vocab_size + 3`. Padding is on the left.
    Training is deterministic, so every call returns an identical (fresh) tokenizer.
    """
    return train_demo_tokenizer(TINY_CORPUS, vocab_size, model_max_length)


def make_tiny_processor(**build_kwargs):
    """`build_processor` on a fresh tiny tokenizer; `build_kwargs` go to `build_processor`."""
    return build_processor(make_tiny_tokenizer(), **build_kwargs)


def phi2_processor(**build_kwargs):
    """`build_processor` on the real Phi-2 tokenizer from ../shared (skips when absent)."""
    return build_processor(str(require_shared(PHI2_TOKENIZER_DIR)), **build_kwargs)


def load_parity_reference(variant: str) -> dict:
    return json.loads((require_shared(PARITY_FIXTURES_DIR / variant) / "reference.json").read_text())


def crops_to_pixel_values(paths: list[Path]) -> np.ndarray:
    """The fixtures' formula: `(png / 255 - 0.5) / 0.5` in float32, channels first, crops stacked."""
    crops = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths]).astype(np.float32)
    return ((crops / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)


def unpadded(row, attention_mask) -> list[int]:
    """The values of a padded row at the positions where the attention mask is 1."""
    return [value for value, keep in zip(row.tolist(), attention_mask.tolist(), strict=True) if keep]
