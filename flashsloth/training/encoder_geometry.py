"""
Stage 0 on varied drawings (the demo recipe's `training_data="varied"`): labels for every patch from the scene geometry.

Free layouts have no slots, so instead of `encoder`'s slot windows every patch learns, through one linear head per
attribute, what the scene's geometry puts there: whether an object covers it, that object's shape, colour and the
colour and shape together, the side of the image the object is on, and how many objects the scene holds. Labels come
from the records' geometry (each object's centre and radius, the canvas size, as `varied_data` writes them;
`synthetic`'s records give their slot and size instead), on the square the processor squashes every image to. Train
with `encoder.pretrain_encoder(..., classifier=PatchClassifier(vision_tower))`.
"""

import functools
import os

import torch
from torch import nn

from . import synthetic
from .encoder import SlotLabelDataset


# Attribute -> its classes. "present" is 0 for a patch no object covers, whose object attributes are not scored;
# "position" is the covering object's side ("none" on no side), or for an uncovered patch its own; "count" is the
# scene's number of objects, on every patch. "object" names colour and shape together ("red circle"): a feature for
# each pair, so that finding an object by both (is there a red circle?) needs no binding of two separate features.
PATCH_ATTRIBUTES = {
    "present": ("no", "yes"),
    "shape": synthetic.SHAPES,
    "color": tuple(synthetic.COLORS),
    "object": tuple(f"{color} {shape}" for color in synthetic.COLORS for shape in synthetic.SHAPES),
    "position": synthetic.POSITIONS + ("none",),
    "count": ("1", "2", "3", "4"),
}
OBJECT_ATTRIBUTES = ("shape", "color", "object")
IGNORE_INDEX = -100


def object_boxes(record: dict) -> list[tuple[float, float, float, float]]:
    """`(x, y, half_width, half_height)` of each object of a record, in fractions of the image's width and height
    (the same fractions on the square the processor squashes it to)."""
    width, height = record.get("width"), record.get("height")
    boxes = []
    for obj in record["objects"]:
        if "center" in obj:
            (x, y), radius = obj["center"], obj["radius"]
        else:  # a `synthetic` record: its slot's centre and its size
            (x, y), radius = synthetic.SLOT_CENTERS[obj["position"]], synthetic.SIZE_RADII[obj["size"]]
        short = min(width, height) if width and height else 1
        boxes.append((x, y, radius * short / (width or 1), radius * short / (height or 1)))
    return boxes


def covering_objects(record: dict, grid: int) -> torch.LongTensor:
    """For each patch of a `grid` x `grid` patch grid (row-major), the index of the object whose box it overlaps
    (the nearest one, relative to its size, where boxes of several do), or -1."""
    half_patch = 0.5 / grid
    boxes = torch.tensor(object_boxes(record), dtype=torch.float64).reshape(-1, 4)
    centers = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    py, px = (axis.reshape(-1, 1) for axis in torch.meshgrid(centers, centers, indexing="ij"))
    distances = torch.maximum(
        (px - boxes[:, 0]).abs() / (boxes[:, 2] + half_patch), (py - boxes[:, 1]).abs() / (boxes[:, 3] + half_patch)
    )  # (patches, objects)
    nearest, index = distances.min(dim=1)
    return torch.where(nearest <= 1, index, -1)


@functools.lru_cache(maxsize=8)
def _patch_sides(grid: int) -> torch.LongTensor:
    """The `PATCH_ATTRIBUTES["position"]` class of each patch's own place (its side, or "none")."""
    from .varied_scenes import side_of

    positions = PATCH_ATTRIBUTES["position"]
    return torch.tensor(
        [positions.index(side_of(((patch % grid + 0.5) / grid, (patch // grid + 0.5) / grid)) or "none")
         for patch in range(grid * grid)]
    )  # fmt: skip


def patch_labels(record: dict, grid: int) -> torch.LongTensor:
    """`(grid * grid, num_attributes)` class ids of every patch of a record's scene (see `PATCH_ATTRIBUTES`)."""
    columns = list(PATCH_ATTRIBUTES)
    per_object = torch.tensor(
        [
            [1]
            + [
                PATCH_ATTRIBUTES[name].index(f"{obj['color']} {obj['shape']}" if name == "object" else obj[name])
                for name in OBJECT_ATTRIBUTES
            ]
            + [PATCH_ATTRIBUTES["position"].index(obj["position"] or "none"), len(record["objects"]) - 1]
            for obj in record["objects"]
        ]
    )  # (objects, attributes) in `columns` order
    assert columns == ["present", *OBJECT_ATTRIBUTES, "position", "count"]
    covering = covering_objects(record, grid)
    labels = per_object[covering.clamp(min=0)]
    uncovered = covering < 0
    labels[uncovered] = IGNORE_INDEX
    labels[uncovered, columns.index("present")] = 0
    labels[uncovered, columns.index("position")] = _patch_sides(grid)[uncovered]
    labels[uncovered, columns.index("count")] = len(record["objects"]) - 1
    return labels


class PatchLabelDataset(SlotLabelDataset):
    """Records that carry `"objects"` -> `{"pixel_values", "labels"}` (the processor's pixels and `patch_labels`)."""

    def __init__(self, records: list[dict], image_folder: str | os.PathLike, image_processor, patch_grid_size: int):
        super().__init__(records, image_folder, image_processor)
        self.patch_grid_size = patch_grid_size

    def labels(self, record: dict) -> torch.LongTensor:
        return patch_labels(record, self.patch_grid_size)


class PatchClassifier(nn.Module):
    """The encoder of a FlashSloth model with a linear head per attribute on every patch; `forward` returns
    `{"loss", "logits"}` as the `Trainer` expects."""

    def __init__(self, vision_tower: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        hidden_size = vision_tower.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(classes)) for classes in PATCH_ATTRIBUTES.values())

    def forward(self, pixel_values: torch.FloatTensor, labels: torch.LongTensor | None = None) -> dict:
        features = self.vision_tower(pixel_values).last_hidden_state  # (batch, grid * grid, hidden)
        logits = [head(features) for head in self.heads]  # per attribute: (batch, patches, classes)
        output = {"logits": tuple(logits)}
        if labels is not None:
            output["loss"] = sum(
                nn.functional.cross_entropy(
                    attribute_logits.flatten(0, 1), labels[..., index].flatten(), ignore_index=IGNORE_INDEX
                )
                for index, attribute_logits in enumerate(logits)
            )
        return output


@torch.no_grad()
def patch_accuracy(classifier: PatchClassifier, dataset: PatchLabelDataset, batch_size: int = 100) -> dict[str, float]:
    """Accuracy of each attribute head on the scored patches of `dataset`."""
    was_training = classifier.training
    classifier.eval()
    correct = torch.zeros(len(PATCH_ATTRIBUTES))
    scored = torch.zeros(len(PATCH_ATTRIBUTES))
    for start in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        labels = torch.stack([item["labels"] for item in items])
        logits = classifier(torch.stack([item["pixel_values"] for item in items]))["logits"]
        for index, attribute_logits in enumerate(logits):
            scored_patches = labels[..., index] != IGNORE_INDEX
            correct[index] += (attribute_logits.argmax(-1) == labels[..., index])[scored_patches].sum()
            scored[index] += scored_patches.sum()
    classifier.train(was_training)
    return {name: (correct[index] / scored[index]).item() for index, name in enumerate(PATCH_ATTRIBUTES)}
