"""
Stage 0 on varied drawings (the demo recipe's `training_data="varied"`): labels for every patch from the scene geometry.

Free layouts have no slots, so instead of `encoder`'s slot windows every patch learns, through one linear head per
attribute, what the scene's geometry puts there: whether an object covers it, that object's colour, the side of the
image the object is on, and how many objects the scene holds. Labels come
from the records' geometry (each object's centre and radius, the canvas size, as `varied_data` writes them;
`synthetic`'s records give their slot and size instead), on the square the processor squashes every image to.

Shape, and colour and shape together, are scored per object instead: on the mean of the features of the patches its
region covers, weighted by how much of each it covers (`object_coverage`). A patch inside a large filled shape cannot
tell the shape from its own pixels; the object's patches together can, and EmbQ's attention and SAP read an object
through such means. With the same 2000 steps, a linear probe on those means finds 76 % of shapes on varied drawings
after this objective, 53 % after shape labels on every patch (docs/demo-model.md). Train with
`encoder.pretrain_encoder(..., classifier=PatchClassifier(vision_tower))`.
"""

import functools
import os

import torch
from PIL import Image, ImageDraw
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
# Scored on each object's pooled patches, not on every patch (see the module docstring).
POOLED_ATTRIBUTES = ("shape", "object")
MAX_OBJECTS = len(synthetic.POSITIONS)
COVERAGE_SUPERSAMPLING = 4  # object regions are drawn at this multiple of the encoder's input to measure coverage
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


def object_coverage(record: dict, image_size: int, patch_size: int) -> torch.Tensor:
    """`(objects, patches)`: the share of each patch (row-major) that each object's region covers (its filled shape,
    also for an outlined one), on the `image_size` square the processor squashes the drawing to."""
    side = image_size * COVERAGE_SUPERSAMPLING
    grid, cell = image_size // patch_size, patch_size * COVERAGE_SUPERSAMPLING
    coverage = []
    for obj, (x, y, half_width, half_height) in zip(record["objects"], object_boxes(record)):
        mask = Image.new("L", (side, side), 0)
        box = ((x - half_width) * side, (y - half_height) * side, (x + half_width) * side, (y + half_height) * side)
        draw = ImageDraw.Draw(mask)
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=1)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=1)
        else:
            draw.polygon([(x * side, box[1]), (box[2], box[3]), (box[0], box[3])], fill=1)
        pixels = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).float()
        coverage.append(pixels.view(grid, cell, grid, cell).mean(dim=(1, 3)).flatten())
    return torch.stack(coverage)


def pooled_labels(record: dict) -> torch.LongTensor:
    """`(MAX_OBJECTS, len(POOLED_ATTRIBUTES))` class ids of each object of a record, `IGNORE_INDEX` past its last."""
    labels = torch.full((MAX_OBJECTS, len(POOLED_ATTRIBUTES)), IGNORE_INDEX, dtype=torch.long)
    for index, obj in enumerate(record["objects"]):
        for column, name in enumerate(POOLED_ATTRIBUTES):
            labels[index, column] = PATCH_ATTRIBUTES[name].index(
                f"{obj['color']} {obj['shape']}" if name == "object" else obj[name]
            )
    return labels


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
    """Records that carry `"objects"` -> `{"pixel_values", "labels", "object_coverage", "object_labels"}`: the
    processor's pixels, `patch_labels`, and each object's `object_coverage` and `pooled_labels` (padded to
    `MAX_OBJECTS` with zero coverage and `IGNORE_INDEX`). Stage 0 reads each drawing several times (2000 steps of 64
    on 36904 drawings), so each item is computed once per process and kept (about 70 KB): a third of a stage-0 step's
    time was spent reading, resizing and labelling drawings."""

    def __init__(self, records: list[dict], image_folder: str | os.PathLike, image_processor, patch_grid_size: int):
        super().__init__(records, image_folder, image_processor)
        self.patch_grid_size = patch_grid_size
        self.items = {}

    def __getitem__(self, index: int) -> dict:
        if index not in self.items:
            self.items[index] = self.load(index)
        return self.items[index]

    def load(self, index: int) -> dict:
        item = super().__getitem__(index)
        record = self.records[index]
        image_size = item["pixel_values"].shape[-1]
        coverage = torch.zeros(MAX_OBJECTS, self.patch_grid_size**2)
        coverage[: len(record["objects"])] = object_coverage(record, image_size, image_size // self.patch_grid_size)
        return {**item, "object_coverage": coverage, "object_labels": pooled_labels(record)}

    def labels(self, record: dict) -> torch.LongTensor:
        return patch_labels(record, self.patch_grid_size)


class PatchClassifier(nn.Module):
    """The encoder of a FlashSloth model with a linear head per attribute: on every patch, or for
    `POOLED_ATTRIBUTES` on each object's coverage-weighted mean patch; `forward` returns `{"loss", "logits"}` as the
    `Trainer` expects (`logits`: one tensor per attribute of `PATCH_ATTRIBUTES`, `(batch, patches, classes)` or
    `(batch, MAX_OBJECTS, classes)`)."""

    def __init__(self, vision_tower: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        hidden_size = vision_tower.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(classes)) for classes in PATCH_ATTRIBUTES.values())

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        object_coverage: torch.FloatTensor,
        labels: torch.LongTensor | None = None,
        object_labels: torch.LongTensor | None = None,
    ) -> dict:
        features = self.vision_tower(pixel_values).last_hidden_state  # (batch, grid * grid, hidden)
        weights = object_coverage / object_coverage.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        object_features = weights @ features  # (batch, MAX_OBJECTS, hidden)
        logits = tuple(
            head(object_features if name in POOLED_ATTRIBUTES else features)
            for name, head in zip(PATCH_ATTRIBUTES, self.heads)
        )
        output = {"logits": logits}
        if labels is not None:
            targets = [
                object_labels[..., POOLED_ATTRIBUTES.index(name)] if name in POOLED_ATTRIBUTES else labels[..., index]
                for index, name in enumerate(PATCH_ATTRIBUTES)
            ]
            output["loss"] = sum(
                nn.functional.cross_entropy(attribute_logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
                for attribute_logits, target in zip(logits, targets)
            )
        return output
