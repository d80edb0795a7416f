"""The varied drawings (`flashsloth.training.varied_scenes`) and the robustness evaluation built on them."""

import random

import pytest

from flashsloth.training import synthetic
from flashsloth.training.varied_scenes import (
    ASPECT_RATIOS,
    COLOR_SHADES,
    FAMILIES,
    HELD_OUT_TEMPLATES,
    MAX_RADIUS,
    MIN_RADIUS,
    make_varied_sample,
    render_varied_scene,
    sample_varied_scene,
    side_of,
)


def scenes(family: str, count: int = 40, seed: int = 0):
    rng = random.Random(seed)
    return [sample_varied_scene(rng, family) for _ in range(count)]


def test_side_of_names_the_dominant_side_or_nothing():
    assert side_of((0.1, 0.5)) == "left" and side_of((0.9, 0.45)) == "right"
    assert side_of((0.5, 0.1)) == "top" and side_of((0.55, 0.95)) == "bottom"
    assert side_of((0.5, 0.5)) is None  # the middle
    assert side_of((0.2, 0.2)) is None  # a corner: left and top alike


def test_base_family_is_the_training_generators_layout():
    for scene in scenes("base"):
        assert (scene.width, scene.height) == (144, 144) and scene.background == "light-grey"
        assert not scene.antialias and scene.blur == 0 and scene.jpeg_quality is None
        for obj in scene.objects:
            assert obj.position in synthetic.POSITIONS and obj.outline_width == 0
            assert obj.rgb == synthetic.COLORS[obj.color]
            assert obj.radius in synthetic.SIZE_RADII.values()


@pytest.mark.parametrize("family", [family for family in FAMILIES if family not in ("base", "mixed")])
def test_each_family_varies_its_own_property_only(family):
    varied = scenes(family)
    base = scenes("base")
    checks = {
        "size_free": any(obj.radius not in synthetic.SIZE_RADII.values() for s in varied for obj in s.objects),
        "background": any(s.background != "light-grey" for s in varied),
        "outline": any(obj.outline_width > 0 for s in varied for obj in s.objects),
        "antialias": any(s.antialias for s in varied),
        "blur": any(s.blur > 0 for s in varied),
        "jpeg": any(s.jpeg_quality is not None for s in varied),
        "aspect": any(s.width != s.height for s in varied),
        "palette": any(obj.rgb != synthetic.COLORS[obj.color] for s in varied for obj in s.objects),
        "free_positions": any(obj.position is None for s in varied for obj in s.objects),
    }
    expected = {
        "position": {"size_free", "free_positions"},  # a free layout draws sizes freely too
        "size": {"size_free"},
        "background": {"background"},
        "outline": {"outline"},
        "antialias": {"antialias"},
        "blur": {"blur"},
        "jpeg": {"jpeg"},
        "aspect": {"aspect"},
        "palette": {"palette"},
        "wording": set(),
    }[family]
    assert {name for name, present in checks.items() if present} == expected
    assert len(varied) == len(base)


def test_ranges_of_the_varied_properties():
    mixed = scenes("mixed", 200)
    for scene in mixed:
        assert 0.5 <= scene.width / scene.height <= 2.0 and 1 <= len(scene.objects) <= 4
        assert scene.jpeg_quality is None or 20 <= scene.jpeg_quality <= 95
        for obj in scene.objects:
            assert MIN_RADIUS <= obj.radius <= MAX_RADIUS
            assert obj.rgb in COLOR_SHADES[obj.color] or obj.rgb == synthetic.COLORS[obj.color]
    ratios = {round(scene.width / scene.height, 1) for scene in mixed}
    assert len(ratios) >= 5 and min(ASPECT_RATIOS) == 0.5 and max(ASPECT_RATIOS) == 2.0


def test_drawings_show_the_answer():
    # A filled shape's centre pixel has the shape's colour (no blur or JPEG in the position family), and the position
    # answer is the side its centre lies on.
    rng = random.Random(3)
    for index in range(30):
        image, record = make_varied_sample(index, rng, "position", "position")
        assert record["conversations"][1]["value"] in synthetic.POSITIONS
    for scene in scenes("position", 20, seed=5):
        image = render_varied_scene(scene, random.Random(0))
        assert image.size == (scene.width, scene.height)
        for obj in scene.objects:
            if not any(other is not obj and _covers(other, obj.center) for other in scene.objects):
                pixel = image.getpixel((int(obj.center[0] * scene.width), int(obj.center[1] * scene.height)))
                assert pixel == obj.rgb
            assert obj.position == side_of(obj.center)


def _covers(other, center) -> bool:
    return abs(other.center[0] - center[0]) < 2 * other.radius and abs(other.center[1] - center[1]) < 2 * other.radius


def test_samples_are_deterministic_and_wordings_held_out():
    first = [make_varied_sample(i, random.Random(7), "mixed", "count") for i in range(3)]
    second = [make_varied_sample(i, random.Random(7), "mixed", "count") for i in range(3)]
    assert [record for _, record in first] == [record for _, record in second]
    assert [image.tobytes() for image, _ in first] == [image.tobytes() for image, _ in second]
    for kind, templates in HELD_OUT_TEMPLATES.items():
        assert not set(templates) & set(synthetic.QUESTION_TEMPLATES[kind])
    rng = random.Random(1)
    for kind in synthetic.QUESTION_KINDS:
        _, record = make_varied_sample(0, rng, "wording", kind)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        assert any(question.startswith(template.split("{")[0]) for template in HELD_OUT_TEMPLATES[kind])
    with pytest.raises(ValueError, match="Unknown family"):
        sample_varied_scene(rng, "cartoon")


def test_robustness_table_on_the_demo_model():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from flashsloth.demo import DEMO_MODEL_DIR
    from flashsloth.demo.robustness import evaluate_robustness, format_robustness

    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    scores = evaluate_robustness(model, processor, per_cell=3, batch_size=60)
    assert set(scores["cells"]) == set(FAMILIES)
    assert scores["per_family"]["base"] >= 0.9  # its own generator's drawings
    assert scores["cells_total"] == len(FAMILIES) * len(synthetic.QUESTION_KINDS)
    table = format_robustness(scores)
    assert table.count("\n| ") == len(FAMILIES) + 1 and f"of {scores['cells_total']} cells" in table


# Training data on varied drawings (`flashsloth.training.varied_data`).


def test_training_wordings_are_never_held_out_ones():
    from flashsloth.training.varied_data import TRAINING_TEMPLATES, held_out_wordings

    assert set(TRAINING_TEMPLATES) == set(synthetic.QUESTION_KINDS)
    for kind, templates in TRAINING_TEMPLATES.items():
        # The base evaluation's wordings are trained on, with several others per kind; none is held out.
        assert templates[:2] == synthetic.QUESTION_TEMPLATES[kind] and len(set(templates)) >= 5
    training = {template for templates in TRAINING_TEMPLATES.values() for template in templates}
    normalized = {template.lower().rstrip("?.") for template in training}
    assert not training & held_out_wordings()
    assert not normalized & {template.lower().rstrip("?.") for template in held_out_wordings()}


def test_captions_of_free_layouts_name_a_side_only_where_there_is_one():
    from flashsloth.training.varied_data import describe_varied
    from flashsloth.training.varied_scenes import VariedObject, VariedScene

    def obj(shape, color, position, center, radius):
        return VariedObject(shape, color, position, center, radius, synthetic.COLORS[color], 0)

    scene = VariedScene(
        objects=(
            obj("circle", "red", None, (0.5, 0.5), 0.2),
            obj("square", "blue", "top", (0.5, 0.1), 0.05),
            obj("triangle", "green", None, (0.15, 0.85), 0.08),
        ),
        width=200, height=100, background="white", background_colors=((255, 255, 255),),
        antialias=False, blur=0.0, jpeg_quality=None,
    )  # fmt: skip
    # Objects on a side first, in the synthetic order, then those on none, left to right, without a position.
    assert describe_varied(scene) == (
        "There are three shapes: a small blue square at the top, a small green triangle, a large red circle."
    )
    # On the synthetic layout the caption is the synthetic generator's.
    rng = random.Random(2)
    for _ in range(20):
        base = sample_varied_scene(rng, "base")
        expected = synthetic.Scene(
            tuple(synthetic.SceneObject(o.shape, o.color, "small" if o.radius < 0.1 else "large", o.position)
                  for o in base.objects),
            (0, 0, 0),
        )  # fmt: skip
        assert describe_varied(base) == synthetic.describe(expected)


def test_training_datasets_are_deterministic_and_answerable(tmp_path):
    import json

    from PIL import Image

    from flashsloth.training.varied_data import TRAINING_TEMPLATES, generate_varied_dataset

    first = generate_varied_dataset(tmp_path / "a", 30, stage=2, seed=4, save_size=24, questions_per_image=2)
    second = generate_varied_dataset(tmp_path / "b", 30, stage=2, seed=4, save_size=24, questions_per_image=2)
    assert first.read_text() == second.read_text()
    records = json.loads(first.read_text())
    assert [record["kind"] for record in records] == [synthetic.QUESTION_KINDS[i % 5] for i in range(30)]
    images = [record["image"] for record in records]
    assert len(set(images)) < len(images) and max(images.count(image) for image in images) == 2
    for record in records:
        with Image.open(first.parent / record["image"]) as image:
            assert image.size == (24, 24)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        answer = record["conversations"][1]["value"]
        objects = record["objects"]
        templates = TRAINING_TEMPLATES[record["kind"]]
        assert any(all(word in question for word in template.split("{")[0].split()) for template in templates)
        if record["kind"] == "count":
            assert answer == str(len(objects))
        if record["kind"] == "position":
            assert answer in synthetic.POSITIONS
            assert [o["position"] for o in objects if o["color"] in question and o["shape"] in question] == [answer]
        for obj in objects:
            assert obj["position"] in synthetic.POSITIONS + (None,) and 0 < obj["radius"] <= MAX_RADIUS
    captions = json.loads(generate_varied_dataset(tmp_path / "c", 40, stage=1, seed=4, save_size=24).read_text())
    assert all(record["conversations"][1]["value"].startswith("There ") for record in captions)
    # Some captions are of free layouts with objects on no side, some of the synthetic layout.
    assert any(o["position"] is None for record in captions for o in record["objects"])
    assert any(record["width"] == record["height"] == 144 for record in captions)
    with pytest.raises(ValueError, match="probabilities"):
        generate_varied_dataset(tmp_path / "d", 3, stage=1, base_share=1.5)


def test_noise_backgrounds_come_from_the_scene_rng_alone():
    from PIL import Image

    from flashsloth.training.varied_scenes import render_varied_scene, sample_scene_varying

    scene = None
    rng = random.Random(3)
    while scene is None or scene.background != "noise":
        scene = sample_scene_varying(rng, {"background"})
    first = render_varied_scene(scene, random.Random(5))
    Image.effect_noise((8, 8), 10)  # advances C's global `rand()`, which must not matter
    second = render_varied_scene(scene, random.Random(5))
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != render_varied_scene(scene, random.Random(6)).tobytes()
