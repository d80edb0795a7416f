"""LLaVA-format training data for FlashSloth: the dataset (JSON records, images opened lazily) and the collator that
turns a batch of conversations into model inputs with labels on the assistant answers only.

A LLaVA record is `{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human", "value":
"<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}`; `image` may be missing (a text-only sample),
a list of paths (several images, one `<image>` marker each), or a `PIL.Image` (records built in memory).
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers.utils import logging


logger = logging.get_logger(__name__)

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Length estimate of one image in tokens for length-grouped batching: 81 pooled tokens and the 9 query tokens.
DEFAULT_IMAGE_LENGTH = 90


def llava_to_messages(conversations: Sequence[dict], has_image: bool, num_images: int = 1) -> list[dict]:
    """
    Convert LLaVA turns to chat messages for the FlashSloth chat template.

    Human turns become `user` messages and gpt turns `assistant` messages, alternating and starting with a user
    turn. Each `<image>` marker becomes an `{"type": "image"}` item at the start of its turn (the template writes
    `<image>\\n` there, as LLaVA's preprocessing does wherever the marker stood). When the sample has images but no
    marker, they go to the start of the first user turn.

    Args:
        conversations: the record's `conversations`, dicts with `from` (`human`/`gpt`, or `user`/`assistant`) and
            `value`.
        has_image: whether the sample comes with images.
        num_images: how many images it comes with (when `has_image`).

    Raises:
        `ValueError`: unknown roles, turns that do not alternate user/assistant starting with the user, a conversation
            that does not end with an answer, markers without images, or marker and image counts that differ.
    """
    if not conversations:
        raise ValueError("The conversation is empty: a training sample needs at least one question and its answer.")
    messages, markers = [], 0
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"Turn {index} must be a dict with 'from' and 'value', got {turn!r}.")
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"Turn {index} has the unknown speaker {turn['from']!r}; use one of {sorted(ROLES)}.")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"Turn {index} is from {turn['from']!r} but a {expected} turn was expected: turns must alternate "
                "human/gpt, starting with a human turn."
            )
        text = str(turn["value"])
        turn_markers = text.count(IMAGE_MARKER) if role == "user" else 0
        if IMAGE_MARKER in text and role == "assistant":
            raise ValueError(f"Turn {index} is an answer with an {IMAGE_MARKER} marker; images go in human turns.")
        markers += turn_markers
        content = [{"type": "image"} for _ in range(turn_markers)]
        text = text.replace(IMAGE_MARKER, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError("The conversation ends with a human turn: every question needs its answer to train on.")

    expected_images = num_images if has_image else 0
    if markers == 0 and expected_images:
        messages[0]["content"][:0] = [{"type": "image"} for _ in range(expected_images)]
    elif markers != expected_images:
        raise ValueError(
            f"The conversation has {markers} {IMAGE_MARKER} marker(s) but the sample has {expected_images} image(s). "
            f"Put one {IMAGE_MARKER} per image in the human turns (or none: the images then open the first turn)."
        )
    return messages


def _load_records(json_path_or_records: str | os.PathLike | Sequence[dict]) -> tuple[list[dict], Path | None]:
    if isinstance(json_path_or_records, (str, os.PathLike)):
        path = Path(json_path_or_records)
        if not path.is_file():
            raise FileNotFoundError(f"Training data not found: {path}. Pass a LLaVA-format JSON file (a list).")
        try:
            with path.open(encoding="utf-8") as file:
                records = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); expected a list of LLaVA records.") from error
        base_folder = path.parent
    else:
        records, base_folder = json_path_or_records, None
    if not isinstance(records, (list, tuple)):
        raise ValueError(f"Training data must be a list of LLaVA records, got {type(records).__name__}.")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"Record {index} has no 'conversations' list; expected a LLaVA record, got {record!r}.")
    return list(records), base_folder


class LlavaDataset(Dataset):
    """
    LLaVA-format conversations with their images, for [`FlashSlothDataCollator`].

    Every item is `{"id", "messages", "images"}`: chat messages (see [`llava_to_messages`]) and the sample's images as
    RGB `PIL.Image`s (opened when the item is read, so the dataset itself stays small).

    Args:
        json_path_or_records: a LLaVA JSON file (a list of records) or the list of records itself.
        image_folder: the folder image paths are relative to; defaults to the JSON file's folder (records given as
            a list need it unless their paths are absolute or their images are `PIL.Image`s).
        image_length: tokens one image counts for in [`LlavaDataset.lengths`].

    Raises:
        `FileNotFoundError` / `ValueError`: a missing or malformed file; a record whose conversation is malformed
            (checked for every record up front, so a bad record fails at once rather than hours into training).
    """

    def __init__(
        self,
        json_path_or_records: str | os.PathLike | Sequence[dict],
        image_folder: str | os.PathLike | None = None,
        image_length: int = DEFAULT_IMAGE_LENGTH,
    ):
        self.records, base_folder = _load_records(json_path_or_records)
        self.image_folder = Path(image_folder) if image_folder is not None else base_folder
        if self.image_folder is not None and not self.image_folder.is_dir():
            raise FileNotFoundError(f"Image folder not found: {self.image_folder}.")
        self.messages = []
        for index, record in enumerate(self.records):
            images = self._image_entries(record)
            try:
                self.messages.append(llava_to_messages(record["conversations"], bool(images), len(images)))
            except ValueError as error:
                raise ValueError(f"Record {index} (id {record.get('id', index)!r}): {error}") from error
        self.lengths = [self._estimate_length(messages, image_length) for messages in self.messages]

    @staticmethod
    def _image_entries(record: dict) -> list:
        images = record.get("image")
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    @staticmethod
    def _estimate_length(messages: list[dict], image_length: int) -> int:
        """Rough token count for length-grouped batching: words of the text plus `image_length` per image."""
        words = images = 0
        for message in messages:
            for item in message["content"]:
                if item["type"] == "image":
                    images += 1
                else:
                    words += len(item["text"].split())
        return words + images * image_length

    def __len__(self) -> int:
        return len(self.records)

    def _open_image(self, entry: Any) -> Image.Image:
        if isinstance(entry, Image.Image):
            return entry.convert("RGB")
        path = Path(entry)
        if not path.is_absolute():
            if self.image_folder is None:
                raise ValueError(f"The image path {entry!r} is relative: pass `image_folder` to the dataset.")
            path = self.image_folder / path
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"Image not found: {path} (check `image_folder`).") from error
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"Cannot read the image {path}: {error}") from error

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "id": record.get("id", index),
            "messages": self.messages[index],
            "images": [self._open_image(entry) for entry in self._image_entries(record)],
        }


class FlashSlothDataCollator:
    """
    Batch [`LlavaDataset`] items into FlashSloth training inputs with the processor and its chat template.

    The prompt is the chat template's (the same text the model sees at inference):
    `SYSTEM USER: <image>\\nq1<learnable> ASSISTANT: a1</s>USER: q2<learnable> ASSISTANT: a2</s>`, one query block per
    user turn when the sample has an image, none for text-only samples (both kinds mix in one batch). `labels` are the
    input ids on the assistant answers and their `</s>` (the template's `{% generation %}` spans) and -100 elsewhere,
    padding included; the model shifts them itself. Padding is on the right, so every sample's positions start at 0.

    Returns a dict with `input_ids`, `attention_mask`, `labels`, `instruction_mask` `[batch, length]`, and
    `pixel_values` `[total_crops, 3, H, W]` / `image_num_crops` `[num_images]` when the batch has images.

    Args:
        processor: a [`FlashSlothProcessor`] whose chat template marks assistant answers with `{% generation %}`.
        max_length: the longest sample in tokens (images and query blocks expanded); a longer sample raises a
            `ValueError` naming it (truncation would cut answers or image blocks), so filter such records out first.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("Cannot collate an empty batch.")
        processor_kwargs = {"padding": True, "padding_side": "right", "return_tensors": "pt"}
        if self.max_length is not None:
            processor_kwargs["max_length"] = self.max_length
        images = [item["images"] for item in items]
        if any(images):
            processor_kwargs["images"] = images
        try:
            batch = self.processor.apply_chat_template(
                [item["messages"] for item in items],
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                processor_kwargs=processor_kwargs,
            )
        except ValueError as error:
            ids = [item.get("id") for item in items]
            raise ValueError(f"Cannot build the batch of samples {ids} (in this order): {error}") from error
        assistant_mask = torch.as_tensor(batch.pop("assistant_masks"), dtype=torch.bool)
        labels = batch["input_ids"].masked_fill(~assistant_mask, IGNORE_INDEX)
        if not bool(assistant_mask.any(dim=1).all()):
            ids = [item.get("id") for item, has in zip(items, assistant_mask.any(dim=1).tolist()) if not has]
            raise ValueError(f"Samples {ids} have no answer tokens to train on; check their conversations.")
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": labels,
            "instruction_mask": batch["instruction_mask"],
        }
        if any(images):
            inputs["pixel_values"] = batch["pixel_values"]
            inputs["image_num_crops"] = batch["image_num_crops"]
        return inputs
