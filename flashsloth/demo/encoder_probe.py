"""
What a demo model's encoder knows about each object, before any question is asked (`flashsloth demo-eval
--encoder-probe`): a linear probe on each object's mean patch feature, per family of drawing.

The language model can only answer what the frozen encoder puts in its patches, and a full `demo-train` run takes most
of an hour; this probe scores an encoder in a minute. For every object of fresh drawings of a family
(`training.varied_scenes`), the features of the patches its region covers are averaged, weighted by how much of each
patch it covers (`training.encoder_geometry.object_coverage`, the pooling the varied recipe's stage 0 trains on), and
a linear classifier learns its shape or colour from two thirds of the objects; the accuracy is on the other third.
Chance is 1/3 for shapes and 1/6 for colours.
"""

import random

import torch
from torch import nn

from ..training.encoder_geometry import object_coverage


PROBED_ATTRIBUTES = ("shape", "color")
# Added to `demo-eval --seed`, as `robustness.ROBUSTNESS_SEED` is: drawings other than the robustness evaluation's.
PROBE_SEED = 3


def fit_linear_probe(features: torch.Tensor, labels: torch.LongTensor, num_classes: int, steps: int = 200) -> float:
    """Held-out accuracy of a linear classifier trained (Adam, full batch) on the first two thirds of `features`
    (standardised with their statistics) and scored on the last third."""
    split = len(labels) * 2 // 3
    if split == 0 or split == len(labels):
        raise ValueError(f"a probe needs at least 2 objects to train and test on, got {len(labels)}")
    mean, std = features[:split].mean(dim=0), features[:split].std(dim=0) + 1e-6
    features = (features - mean) / std
    generator = torch.Generator().manual_seed(0)
    probe = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(probe(features[:split]), labels[:split])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (probe(features[split:]).argmax(dim=-1) == labels[split:]).float().mean().item()


@torch.no_grad()
def probe_encoder(vision_tower, image_processor, per_family: int = 300, seed: int = PROBE_SEED, batch_size: int = 100):
    """
    Probe accuracy of each attribute in `PROBED_ATTRIBUTES` per family of drawing (`per_family` drawings each,
    deterministic by `seed`). Returns `{"cells": {family: {attribute: accuracy}}, "objects": {family: count},
    "per_family": int}`.
    """
    from ..training import synthetic
    from ..training.varied_data import scene_record
    from ..training.varied_scenes import FAMILIES, render_varied_scene, sample_varied_scene

    image_size, patch_size = vision_tower.config.image_size, vision_tower.config.patch_size
    classes = {"shape": synthetic.SHAPES, "color": tuple(synthetic.COLORS)}
    cells, objects = {}, {}
    # The question wording does not change a drawing, so the `wording` family is left out.
    for family in (family for family in FAMILIES if family != "wording"):
        rng = random.Random(f"flashsloth-encoder-probe-{seed}-{family}")
        scenes = [sample_varied_scene(rng, family) for _ in range(per_family)]
        pooled, labels = [], {attribute: [] for attribute in PROBED_ATTRIBUTES}
        for start in range(0, per_family, batch_size):
            batch = scenes[start : start + batch_size]
            pixel_values = image_processor([render_varied_scene(scene, rng) for scene in batch], return_tensors="pt")
            pixel_values = pixel_values["pixel_values"].flatten(0, -4)
            features = vision_tower(pixel_values).last_hidden_state  # (drawings, patches, hidden)
            for scene, scene_features in zip(batch, features):
                record = scene_record(scene, "probe", "probe", ("", ""))
                coverage = object_coverage(record, image_size, patch_size)  # (objects, patches)
                pooled.append(coverage @ scene_features / coverage.sum(dim=1, keepdim=True).clamp(min=1e-6))
                for attribute in PROBED_ATTRIBUTES:
                    labels[attribute] += [classes[attribute].index(getattr(obj, attribute)) for obj in scene.objects]
        pooled = torch.cat(pooled)
        objects[family] = len(pooled)
        cells[family] = {
            attribute: fit_linear_probe(pooled, torch.tensor(labels[attribute]), len(classes[attribute]))
            for attribute in PROBED_ATTRIBUTES
        }
    return {"cells": cells, "objects": objects, "per_family": per_family}


def format_probe(scores: dict) -> str:
    """A markdown table: one row per family, one column per probed attribute, and the objects probed."""
    lines = [
        "| family | " + " | ".join(PROBED_ATTRIBUTES) + " | objects |",
        "|---" + "|---:" * (len(PROBED_ATTRIBUTES) + 1) + "|",
    ]
    for family, row in scores["cells"].items():
        accuracies = " | ".join(f"{100 * row[attribute]:.1f}%" for attribute in PROBED_ATTRIBUTES)
        lines.append(f"| {family} | {accuracies} | {scores['objects'][family]} |")
    lines += ["", "Chance: 33.3 % for shapes, 16.7 % for colours; a third of each family's objects is held out."]
    return "\n".join(lines)
