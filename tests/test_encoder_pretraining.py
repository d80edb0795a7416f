"""Stage 0 of the demo recipe: the tiny encoder learns the scenes' slot labels."""

import json

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
