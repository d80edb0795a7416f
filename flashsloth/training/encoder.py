"""
Stage 0 of the demo recipe: pre-training the tiny SigLIP-shaped encoder on the synthetic scenes.

FlashSloth starts from a pre-trained SigLIP and keeps it frozen in both stages; a tiny encoder trained from scratch
has no such start. This stage stands in for SigLIP's own pre-training: the encoder learns to name what each slot of
the scene holds (empty or not, and the object's shape, colour and size) and where the slot is, through one linear head
per attribute, applied to every patch of the slot's pooling window: each patch learns what the object of its window is,
which is what EmbQ's attention over the patches looks for, and where it is, which the language model cannot tell from
the order of the visual tokens alone. The heads are thrown away; only the encoder's weights are kept.
"""

import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from . import synthetic


# Attribute -> its classes; "present" is 0 for an empty slot, whose object attributes are not scored; every slot has
# its "position". "object" names colour and shape together ("red circle"): a feature for each pair, so that finding
# an object by both (is there a red circle?) needs no binding of two separate features.
SLOT_ATTRIBUTES = {
    "present": ("no", "yes"),
    "shape": synthetic.SHAPES,
    "color": tuple(synthetic.COLORS),
    "size": synthetic.SIZES,
    "object": tuple(f"{color} {shape}" for color in synthetic.COLORS for shape in synthetic.SHAPES),
    "position": synthetic.POSITIONS,
}
OBJECT_ATTRIBUTES = ("shape", "color", "size", "object")
IGNORE_INDEX = -100


def slot_labels(objects: list[dict]) -> torch.LongTensor:
    """`(num_slots, num_attributes)` class ids of a scene's `objects` (records' `"objects"`), in `POSITIONS` order."""
    columns = list(SLOT_ATTRIBUTES)
    labels = torch.full((len(synthetic.POSITIONS), len(columns)), IGNORE_INDEX, dtype=torch.long)
    labels[:, columns.index("present")] = 0
    labels[:, columns.index("position")] = torch.arange(len(synthetic.POSITIONS))
    for obj in objects:
        slot = synthetic.POSITIONS.index(obj["position"])
        labels[slot, columns.index("present")] = 1
        for name in OBJECT_ATTRIBUTES:
            value = f"{obj['color']} {obj['shape']}" if name == "object" else obj[name]
            labels[slot, columns.index(name)] = SLOT_ATTRIBUTES[name].index(value)
    return labels


def slot_windows(windows_per_side: int) -> list[int]:
    """Index (row-major) of the pooling window holding each slot's centre, in `POSITIONS` order."""
    return [
        int(y * windows_per_side) * windows_per_side + int(x * windows_per_side)
        for x, y in (synthetic.SLOT_CENTERS[position] for position in synthetic.POSITIONS)
    ]


class SlotLabelDataset(Dataset):
    """Synthetic records that carry `"objects"` -> `{"pixel_values", "labels"}` through the FlashSloth image processor."""

    def __init__(self, records: list[dict], image_folder: str | os.PathLike, image_processor):
        missing = [record.get("id") for record in records if "objects" not in record]
        if missing:
            raise ValueError(
                f"{len(missing)} records have no 'objects' (e.g. {missing[0]!r}): encoder pre-training needs the "
                "scene labels that `synthetic.generate_dataset` and `varied_data.generate_varied_dataset` write."
            )
        self.records = records
        self.image_folder = Path(image_folder)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        with Image.open(self.image_folder / record["image"]) as image:
            pixel_values = self.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values.reshape(pixel_values.shape[-3:]), "labels": self.labels(record)}

    def labels(self, record: dict) -> torch.LongTensor:
        return slot_labels(record["objects"])


class SlotClassifier(nn.Module):
    """The encoder of a FlashSloth model with a linear head per slot attribute on every patch of each slot's pooling
    window; `forward` returns `{"loss", "logits"}` as the `Trainer` expects."""

    def __init__(self, vision_tower: nn.Module, patch_grid_size: int, pooling_window: int):
        super().__init__()
        self.vision_tower = vision_tower
        self.patch_grid_size = patch_grid_size
        self.pooling_window = pooling_window
        self.slot_windows = slot_windows(patch_grid_size // pooling_window)
        hidden_size = vision_tower.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(classes)) for classes in SLOT_ATTRIBUTES.values())

    def slot_features(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """`(batch, channels, height, width)` -> `(batch, num_slots, window * window, hidden_size)`: the features of
        the patches of each slot's window, row-major."""
        features = self.vision_tower(pixel_values).last_hidden_state  # (batch, grid * grid, hidden)
        batch, hidden = features.shape[0], features.shape[-1]
        windows, window = self.patch_grid_size // self.pooling_window, self.pooling_window
        features = features.view(batch, windows, window, windows, window, hidden).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(batch, windows * windows, window * window, hidden)[:, self.slot_windows]

    def forward(self, pixel_values: torch.FloatTensor, labels: torch.LongTensor | None = None) -> dict:
        slot_features = self.slot_features(pixel_values)
        # Per attribute: (batch, num_slots, patches per window, num_classes).
        logits = [head(slot_features) for head in self.heads]
        output = {"logits": tuple(logits)}
        if labels is not None:
            patches_per_window = slot_features.shape[2]
            output["loss"] = sum(
                nn.functional.cross_entropy(
                    attribute_logits.flatten(0, 2),
                    labels[..., index, None].expand(-1, -1, patches_per_window).flatten(),
                    ignore_index=IGNORE_INDEX,
                )
                for index, attribute_logits in enumerate(logits)
            )
        return output


@torch.no_grad()
def slot_accuracy(classifier: SlotClassifier, dataset: SlotLabelDataset, batch_size: int = 100) -> dict[str, float]:
    """Accuracy of each attribute head on `dataset`, from the mean of its logits over the patches of a slot's window
    (empty slots count only for "present" and "position")."""
    was_training = classifier.training
    classifier.eval()
    correct = torch.zeros(len(SLOT_ATTRIBUTES))
    scored = torch.zeros(len(SLOT_ATTRIBUTES))
    for start in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        labels = torch.stack([item["labels"] for item in items])
        logits = classifier(torch.stack([item["pixel_values"] for item in items]))["logits"]
        for index, attribute_logits in enumerate(logits):
            attribute_logits = attribute_logits.mean(dim=2)
            scored_slots = labels[..., index] != IGNORE_INDEX
            correct[index] += (attribute_logits.argmax(-1) == labels[..., index])[scored_slots].sum()
            scored[index] += scored_slots.sum()
    classifier.train(was_training)
    return {name: (correct[index] / scored[index]).item() for index, name in enumerate(SLOT_ATTRIBUTES)}


def pretrain_encoder(model, dataset: Dataset, output_dir, classifier: nn.Module | None = None, **training_args):
    """
    Train `model`'s vision tower in place on `dataset` with the `Trainer` (`training_args` are `TrainingArguments`)
    and return the classifier, whose heads can score the result with [`slot_accuracy`]. `classifier` defaults to a
    [`SlotClassifier`] on the vision tower (with a [`SlotLabelDataset`]); `encoder_geometry.PatchClassifier` labels
    every patch from the scene geometry instead (with an `encoder_geometry.PatchLabelDataset`).
    """
    from transformers import Trainer

    from .trainer import build_training_arguments

    config = model.config
    if classifier is None:
        classifier = SlotClassifier(model.model.vision_tower, config.patch_grid_size, config.pooling_window)
    classifier.train()
    # Every head and encoder layer gets a gradient at every step.
    args = build_training_arguments(output_dir, ddp_find_unused_parameters=False, **training_args)
    Trainer(model=classifier, args=args, train_dataset=dataset).train()
    return classifier
