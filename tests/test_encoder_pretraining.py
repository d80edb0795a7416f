"""Stage 0 of the demo recipe: the tiny encoder learns the scenes' slot labels, or (`encoder_geometry`) what the scene
geometry puts on every patch."""

import json
import random

import pytest
import torch

from flashsloth.demo import build_demo_model, demo_recipe_defaults
from flashsloth.training import synthetic
from flashsloth.training.encoder import (
    IGNORE_INDEX,
    SLOT_ATTRIBUTES,
    SlotClassifier,
    SlotLabelDataset,
    pretrain_encoder,
    slot_accuracy,
    slot_labels,
    slot_windows,
)
from flashsloth.training.encoder_geometry import (
    PATCH_ATTRIBUTES,
    MAX_OBJECTS,
    POOLED_ATTRIBUTES,
    PatchClassifier,
    PatchLabelDataset,
    covering_objects,
    patch_labels,
)
from flashsloth.training.varied_data import sample_training_scene, scene_record

from processing_helpers import make_tiny_processor


def test_slot_labels_name_each_slot_and_skip_empty_ones():
    assert list(SLOT_ATTRIBUTES) == ["present", "shape", "color", "size", "object", "position"]
    labels = slot_labels([{"shape": "triangle", "color": "orange", "size": "large", "position": "top"}])
    top = synthetic.POSITIONS.index("top")
    orange = list(synthetic.COLORS).index("orange")
    # "object" is the colour and shape pair: 6 colours x 3 shapes, colour-major.
    assert len(SLOT_ATTRIBUTES["object"]) == 18 and SLOT_ATTRIBUTES["object"][3 * orange + 2] == "orange triangle"
    assert labels[top].tolist() == [1, 2, orange, 1, 3 * orange + 2, top]
    empty = [slot for slot in range(len(synthetic.POSITIONS)) if slot != top]
    assert (labels[empty, 0] == 0).all() and (labels[empty, 1:5] == IGNORE_INDEX).all()
    # Every slot, empty or not, is labelled with where it is.
    assert labels[:, 5].tolist() == list(range(len(synthetic.POSITIONS)))
    assert labels.shape == (len(synthetic.POSITIONS), len(SLOT_ATTRIBUTES))


COLUMNS = list(PATCH_ATTRIBUTES)


def test_patch_labels_of_a_drawn_free_layout():
    assert COLUMNS == ["present", "shape", "color", "object", "position", "count"]
    # A 2:1 canvas: an orange triangle on the right, a small blue circle near the middle (on no side).
    record = {
        "width": 200, "height": 100,
        "objects": [
            {"shape": "triangle", "color": "orange", "position": "right", "center": [0.78, 0.5], "radius": 0.18},
            {"shape": "circle", "color": "blue", "position": None, "center": [0.45, 0.5], "radius": 0.05},
        ],
    }  # fmt: skip
    grid = 10
    covering = covering_objects(record, grid).reshape(grid, grid)
    # The triangle's box spans x 0.69-0.87 (0.18 of the short side is 0.09 of the width) and y 0.32-0.68: with half
    # a patch (0.05) of tolerance, the patches with centres at x 0.65-0.85 (columns 6-8), y 0.35-0.65 (rows 3-6).
    assert (covering[3:7, 6:9] == 0).all() and (covering == 0).sum() == 12
    assert (covering[:, 9] == -1).all()
    # The small circle (x 0.425-0.475, y 0.45-0.55) covers the patches whose centres are within half a patch of it.
    assert covering[4:6, 4].tolist() == [1, 1] and (covering == 1).sum() == 2
    labels = patch_labels(record, grid)
    orange, blue = list(synthetic.COLORS).index("orange"), list(synthetic.COLORS).index("blue")
    triangle_patch, circle_patch, empty_patch = 4 * grid + 7, 4 * grid + 4, 0
    assert labels[triangle_patch].tolist() == [1, 2, orange, 3 * orange + 2, synthetic.POSITIONS.index("right"), 1]
    assert labels[circle_patch].tolist() == [1, 0, blue, 3 * blue + 0, PATCH_ATTRIBUTES["position"].index("none"), 1]
    # An uncovered patch: no object attributes, its own place (a corner is on no side), the scene's count.
    assert labels[empty_patch].tolist() == [0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 1]
    assert labels[5 * grid].tolist()[4] == synthetic.POSITIONS.index("left")


def test_patch_labels_of_synthetic_records_use_their_slots():
    labels = patch_labels({"objects": [{"shape": "square", "color": "red", "size": "large", "position": "top"}]}, 9)
    grid = labels[:, 0].reshape(9, 9)
    # The top slot's centre is (1/2, 1/6), a large object's radius 0.13: rows 0-2, columns 3-5.
    assert grid.sum() == 9 and (grid[0:3, 3:6] == 1).all()
    assert (labels[grid.flatten() == 1, 4] == synthetic.POSITIONS.index("top")).all()


def test_every_drawn_object_covers_a_patch():
    rng = random.Random(4)
    for index in range(100):
        scene = sample_training_scene(rng, base_share=0.2, vary_share=0.8)
        covering = covering_objects(scene_record(scene, "x", "caption", ("q", "a")), 12)
        assert set(covering.tolist()) - {-1} == set(range(len(scene.objects)))


def test_slot_windows_are_the_edge_cells_of_the_window_grid():
    # left, right, top, bottom of a 3x3 grid (row-major), and of a 6x6 one.
    assert slot_windows(3) == [3, 5, 1, 7]
    assert slot_windows(6) == [3 * 6 + 1, 3 * 6 + 5, 1 * 6 + 3, 5 * 6 + 3]


@pytest.fixture(scope="module")
def tiny_stage0(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage0")
    records = json.loads(synthetic.generate_dataset(folder, 48, stage=1, seed=3, image_size=72).read_text())
    recipe = {**demo_recipe_defaults(), "image_size": 36, "patch_size": 4, "vision_hidden_size": 32}
    recipe.update(vision_layers=2, text_hidden_size=32, text_layers=2)
    processor = make_tiny_processor(image_size=36, num_image_tokens_per_crop=9)
    model = build_demo_model(processor, recipe)
    return model, SlotLabelDataset(records, folder, processor.image_processor)


def test_dataset_items_are_processed_pixels_and_labels(tiny_stage0):
    model, dataset = tiny_stage0
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 36, 36) and item["pixel_values"].abs().max() <= 1
    assert torch.equal(item["labels"], slot_labels(dataset.records[0]["objects"]))
    with pytest.raises(ValueError, match="no 'objects'.*generate_dataset"):
        SlotLabelDataset([{"id": "x", "image": "x.png"}], ".", None)


def test_classifier_reads_the_patches_of_the_slot_windows(tiny_stage0):
    model, dataset = tiny_stage0
    classifier = SlotClassifier(model.model.vision_tower, patch_grid_size=9, pooling_window=3)
    pixel_values = torch.stack([dataset[index]["pixel_values"] for index in range(2)])
    features = model.model.vision_tower(pixel_values).last_hidden_state.view(2, 9, 9, -1)
    # The left slot is the window at rows 3-5, columns 0-2 of the 9x9 patch grid; the top one rows 0-2, columns 3-5.
    slot_features = classifier.slot_features(pixel_values)
    assert slot_features.shape == (2, 4, 9, features.shape[-1])
    torch.testing.assert_close(slot_features[:, 0], features[:, 3:6, 0:3].reshape(2, 9, -1))
    torch.testing.assert_close(slot_features[:, 2], features[:, 0:3, 3:6].reshape(2, 9, -1))


def test_classifier_scores_every_patch(tiny_stage0):
    model, slot_dataset = tiny_stage0
    dataset = PatchLabelDataset(slot_dataset.records, slot_dataset.image_folder, slot_dataset.image_processor, 9)
    classifier = PatchClassifier(model.model.vision_tower)
    items = [dataset[index] for index in range(2)]
    batch = {name: torch.stack([item[name] for item in items]) for name in items[0]}
    output = classifier(**batch)
    # Shape and colour+shape are scored on each object's pooled patches (up to 4 objects), the others on every patch.
    assert [tuple(logits.shape) for logits in output["logits"]] == [
        (2, MAX_OBJECTS if name in POOLED_ATTRIBUTES else 81, len(classes)) for name, classes in PATCH_ATTRIBUTES.items()
    ]
    assert output["loss"].ndim == 0 and torch.isfinite(output["loss"])
    # The pooled features are each object's patch features weighted by its coverage, which sums to its area.
    record = dataset.records[0]
    assert batch["object_coverage"][0, len(record["objects"]) :].sum() == 0
    assert (batch["object_labels"][0, len(record["objects"]) :] == IGNORE_INDEX).all()
    features = model.model.vision_tower(batch["pixel_values"]).last_hidden_state
    first = batch["object_coverage"][0, 0]
    shape_head = classifier.heads[list(PATCH_ATTRIBUTES).index("shape")]
    expected = shape_head((first[:, None] * features[0]).sum(0) / first.sum())
    torch.testing.assert_close(output["logits"][list(PATCH_ATTRIBUTES).index("shape")][0, 0], expected)
    shape = record["objects"][0]["shape"]
    assert batch["object_labels"][0, 0, POOLED_ATTRIBUTES.index("shape")] == synthetic.SHAPES.index(shape)


def test_patch_dataset_keeps_each_item_it_computed(tiny_stage0):
    _, slot_dataset = tiny_stage0
    dataset = PatchLabelDataset(slot_dataset.records, slot_dataset.image_folder, slot_dataset.image_processor, 9)
    first = dataset[1]
    assert dataset[1] is first and list(dataset.items) == [1]
    fresh = dataset.load(1)
    assert fresh is not first and fresh.keys() == first.keys()
    for name in first:
        torch.testing.assert_close(first[name], fresh[name], rtol=0, atol=0)


def test_pretraining_changes_only_the_encoder_and_learns(tiny_stage0, tmp_path):
    model, dataset = tiny_stage0
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    untrained = slot_accuracy(SlotClassifier(model.model.vision_tower, 9, 3), dataset)
    classifier = pretrain_encoder(
        model, dataset, tmp_path, per_device_train_batch_size=16, max_steps=40, learning_rate=3e-3,
        save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
    trained = slot_accuracy(classifier, dataset)
    assert trained["present"] > untrained["present"] or trained["present"] == 1.0
    assert trained["color"] > untrained["color"]
    assert trained["position"] > untrained["position"] or trained["position"] == 1.0
