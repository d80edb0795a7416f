"""The encoder probe of `flashsloth demo-eval --encoder-probe` (`flashsloth.demo.encoder_probe`)."""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flashsloth.demo.encoder_probe import fit_linear_probe, format_probe, probe_encoder
from flashsloth.training.encoder_geometry import object_coverage
from flashsloth.training.varied_data import scene_record
from flashsloth.training.varied_scenes import FAMILIES, VariedObject, VariedScene


def record_of(shape: str, width: int = 144, height: int = 144, center=(0.5, 0.5), radius=0.25) -> dict:
    obj = VariedObject(shape, "red", None, center, radius, (255, 0, 0), 0)
    scene = VariedScene((obj,), width, height, "white", ((255, 255, 255),), False, 0.0, None)
    return scene_record(scene, "test", "test", ("", ""))


@pytest.mark.parametrize("shape, area", [("circle", math.pi), ("square", 4.0), ("triangle", 2.0)])
def test_coverage_is_the_shapes_area_on_the_squashed_square(shape, area):
    # Radius 0.25 of the short side; on a 2:1 canvas squashed to 72 x 72 the region is half as wide.
    for width, squash in ((144, 1.0), (288, 0.5)):
        coverage = object_coverage(record_of(shape, width=width), image_size=72, patch_size=8)
        assert coverage.shape == (1, 81)
        expected = area * (0.25 * 72) ** 2 * squash / 64  # in patches of 8 x 8 pixels
        assert coverage.sum().item() == pytest.approx(expected, rel=0.04)
        assert coverage.max() <= 1 and coverage.min() >= 0


def test_coverage_lies_where_the_object_is():
    coverage = object_coverage(record_of("square", center=(0.2, 0.8), radius=0.1), image_size=72, patch_size=8)
    grid = coverage.view(9, 9)  # rows are y
    assert grid[7, 1] == 1  # the patch at x = 0.17-0.22, y = 0.78-0.89 lies inside the square
    assert grid[:5].sum() == 0 and grid[:, 4:].sum() == 0


def test_linear_probe_learns_a_separable_attribute_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    features = torch.randn(300, 8, generator=generator)
    assert fit_linear_probe(features, labels, 3) < 0.5  # noise: about chance
    features[:, 0] += 8 * labels  # the class is readable along one axis
    assert fit_linear_probe(features, labels, 3) > 0.95
    with pytest.raises(ValueError, match="at least 2 objects"):
        fit_linear_probe(features[:1], labels[:1], 3)


class MeanColourTower(nn.Module):
    """A stand-in encoder whose patch features are each patch's mean colour: it knows colours, not shapes."""

    def __init__(self, image_size: int = 72, patch_size: int = 8):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, patch_size=patch_size)

    def forward(self, pixel_values):
        features = nn.functional.avg_pool2d(pixel_values, self.config.patch_size)  # (batch, 3, grid, grid)
        return SimpleNamespace(last_hidden_state=features.flatten(2).transpose(1, 2))


def test_probe_finds_the_colours_a_tower_holds_in_every_family():
    from transformers import AutoProcessor

    from flashsloth.demo import DEMO_MODEL_DIR

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    scores = probe_encoder(MeanColourTower(), processor.image_processor, per_family=60)
    assert set(scores["cells"]) == set(FAMILIES) - {"wording"}
    # Pooling the object's own patches reads its colour; a tower of constant features would be at chance (1/6).
    # Mixed drawings defeat a mean colour (outlines on coloured backgrounds), single variations hardly do.
    assert min(row["color"] for family, row in scores["cells"].items() if family != "mixed") > 0.8
    assert scores["cells"]["base"]["color"] > 0.95 and scores["cells"]["mixed"]["color"] > 0.25
    assert all(count >= 60 for count in scores["objects"].values())
    table = format_probe(scores)
    assert table.count("\n| ") == len(scores["cells"]) and "| base |" in table


def test_demo_eval_refuses_two_evaluations_at_once():
    result = subprocess.run(
        [sys.executable, "-m", "flashsloth.cli", "demo-eval", "--robustness", "--encoder-probe"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "choose one" in result.stderr
