"""The synthetic shapes data, the demo recipe and the embedded demo model."""

import collections
import filecmp
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flashsloth
from flashsloth.demo import (
    DEMO_MODEL_DIR,
    DEMO_SYSTEM_PROMPT,
    check_recipe,
    demo_chat_template,
    demo_recipe_defaults,
    evaluate,
    format_scores,
    generate_recipe_data,
    kind_cycle,
    tokenizer_corpus,
    trained_variant,
)
from flashsloth.processing import FlashSlothImageProcessor
from flashsloth.demo.recipe import VARIED_RECIPE, recipe_defaults
from flashsloth.training import synthetic
from flashsloth.training.varied_data import TRAINING_TEMPLATES
from flashsloth.training.varied_scenes import FAMILIES, HELD_OUT_TEMPLATES


PACKAGE_DIR = Path(flashsloth.__file__).resolve().parent
REMOTE_CODE_SOURCES = {
    "configuration_flashsloth.py": PACKAGE_DIR / "configuration_flashsloth.py",
    "modeling_flashsloth.py": PACKAGE_DIR / "modeling_flashsloth.py",
    "layout_flashsloth.py": PACKAGE_DIR / "layout_flashsloth.py",
    "outputs_flashsloth.py": PACKAGE_DIR / "outputs_flashsloth.py",
    "image_processing_flashsloth.py": PACKAGE_DIR / "processing" / "image_processing_flashsloth.py",
    "processing_flashsloth.py": PACKAGE_DIR / "processing" / "processing_flashsloth.py",
}


def run_flashsloth(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "flashsloth.cli", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def scene_answer(scene: synthetic.Scene, kind: str, question: str) -> str:
    """Answer a question from the scene, independently of `synthetic.ask`: find the words it names."""
    words = question.rstrip("?").split()
    color = next((word for word in words if word in synthetic.COLORS), None)
    shape = next((word for word in words if word in synthetic.SHAPES), None)
    matches = [obj for obj in scene.objects if color in (None, obj.color) and shape in (None, obj.shape)]
    if kind == "count":
        return str(len(scene.objects))
    if kind == "exist":
        return "yes" if matches else "no"
    assert len(matches) == 1, f"{question!r} is ambiguous for {scene}"
    return {"color": matches[0].color, "shape": matches[0].shape, "position": matches[0].position}[kind]


def test_every_question_has_one_right_answer():
    rng = random.Random(0)
    answers = {kind: set() for kind in synthetic.QUESTION_KINDS}
    for index in range(1000):
        scene, record = synthetic.make_sample(index, 2, rng)
        question = record["conversations"][0]["value"]
        assert question.startswith("<image>\n")
        answer = record["conversations"][1]["value"]
        assert answer == scene_answer(scene, record["kind"], question[len("<image>\n") :])
        answers[record["kind"]].add(answer)
        positions = [obj.position for obj in scene.objects]
        assert 1 <= len(positions) <= 4 and len(set(positions)) == len(positions)
    assert answers["count"] == {"1", "2", "3", "4"}
    assert answers["exist"] == {"yes", "no"}
    assert answers["position"] == set(synthetic.POSITIONS)
    assert answers["color"] == set(synthetic.COLORS) and answers["shape"] == set(synthetic.SHAPES)


def question_kind(question: str) -> str:
    """The kind of a question, from its opening words (independently of the generator's templates table)."""
    openings = {
        "count": ("How many",),
        "exist": ("Is there", "Does the image contain"),
        "position": ("Where", "In which part"),
        "color": ("What color", "Which color"),
        "shape": ("What shape", "Which shape"),
    }
    (kind,) = [kind for kind, starts in openings.items() if question.startswith(starts)]
    return kind


def test_multi_turn_samples_ask_other_kinds_about_the_same_scene():
    rng = random.Random(0)
    turn_counts = set()
    for index in range(300):
        scene, record = synthetic.make_sample(index, 2, rng, turns=3)
        conversations = record["conversations"]
        assert [turn["from"] for turn in conversations] == ["human", "gpt"] * (len(conversations) // 2)
        questions = [turn["value"] for turn in conversations[::2]]
        assert questions[0].startswith("<image>\n") and not any("<image>" in q for q in questions[1:])
        questions[0] = questions[0][len("<image>\n") :]
        kinds = [question_kind(question) for question in questions]
        assert kinds[0] == record["kind"] == synthetic.QUESTION_KINDS[index % 5] and len(set(kinds)) == len(kinds)
        for question, kind, answer in zip(questions, kinds, conversations[1::2]):
            assert answer["value"] == scene_answer(scene, kind, question)
        turn_counts.add(len(questions))
    assert turn_counts == {2, 3}  # a follow-up kind without an unambiguous question on the scene is left out
    with pytest.raises(ValueError, match="turns must be at least 1"):
        synthetic.make_sample(0, 2, rng, turns=0)


def test_rendered_objects_have_their_colour_at_their_slot():
    rng = random.Random(1)
    for _ in range(50):
        scene = synthetic.sample_scene(rng)
        pixels = np.asarray(synthetic.render_scene(scene, 144, rng))
        for obj in scene.objects:
            x, y = synthetic.SLOT_CENTERS[obj.position]
            # The centre moves by at most MAX_JITTER; a small object still covers the slot centre then.
            assert tuple(pixels[int(y * 144), int(x * 144)]) == synthetic.COLORS[obj.color]


def test_dataset_is_deterministic_and_balanced(tmp_path):
    first = synthetic.generate_dataset(tmp_path / "a", 25, stage=2, seed=7, image_size=48)
    second = synthetic.generate_dataset(tmp_path / "b", 25, stage=2, seed=7, image_size=48)
    other_seed = synthetic.generate_dataset(tmp_path / "c", 25, stage=2, seed=8, image_size=48)
    assert first.read_text() == second.read_text() != other_seed.read_text()
    records = json.loads(first.read_text())
    assert all(filecmp.cmp(first.parent / r["image"], second.parent / r["image"], shallow=False) for r in records)
    kinds = [record["kind"] for record in records]
    assert {kinds.count(kind) for kind in synthetic.QUESTION_KINDS} == {5}
    captions = json.loads(synthetic.generate_dataset(tmp_path / "d", 3, stage=1, seed=7).read_text())
    assert all(record["conversations"][1]["value"].startswith("There ") for record in captions)
    # Every record carries its scene: the caption can be rebuilt from the objects.
    for record in captions + records:
        scene = synthetic.Scene(tuple(synthetic.SceneObject(**obj) for obj in record["objects"]), (0, 0, 0))
        if record["kind"] == "caption":
            assert synthetic.describe(scene) == record["conversations"][1]["value"]
        else:
            assert scene_answer(scene, record["kind"], record["conversations"][0]["value"][len("<image>\n") :]) == (
                record["conversations"][1]["value"]
            )


def test_saved_images_hold_the_rendered_pixels(tmp_path):
    # The PNGs are written at zlib's fastest level: lossless, so they decode to exactly what `render_scene` drew.
    data = synthetic.generate_dataset(tmp_path, 6, stage=2, seed=5, image_size=40)
    rng = random.Random("flashsloth-synthetic-5-2")
    for index, record in enumerate(json.loads(data.read_text())):
        scene, replayed = synthetic.make_sample(index, 2, rng)
        drawn = np.asarray(synthetic.render_scene(scene, 40, rng))
        assert replayed == record
        with Image.open(tmp_path / record["image"]) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), drawn)


def test_images_stored_downscaled_give_the_pixel_values_of_the_drawings(tmp_path):
    # The demo recipe stores its scenes at the encoder's input size: the processor must see no difference.
    image_processor = FlashSlothImageProcessor(size={"height": 24, "width": 24})
    data = synthetic.generate_dataset(tmp_path, 6, stage=1, seed=5, image_size=48, save_size=24)
    rng = random.Random("flashsloth-synthetic-5-1")
    drawings, stored = [], []
    for index, record in enumerate(json.loads(data.read_text())):
        scene, _ = synthetic.make_sample(index, 1, rng)
        drawings.append(synthetic.render_scene(scene, 48, rng))
        with Image.open(tmp_path / record["image"]) as image:
            assert image.size == (24, 24)
            stored.append(image.convert("RGB"))
    expected = image_processor(drawings, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(image_processor(stored, return_tensors="np")["pixel_values"], expected)


def test_bad_generator_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="stage must be 1"):
        synthetic.generate_dataset(tmp_path, 3, stage=3)
    with pytest.raises(ValueError, match="num_samples"):
        synthetic.generate_dataset(tmp_path, 0, stage=1)
    with pytest.raises(ValueError, match="save_size must be between 1 and image_size"):
        synthetic.generate_dataset(tmp_path, 3, stage=1, image_size=48, save_size=96)
    with pytest.raises(ValueError, match="Unknown question kind"):
        synthetic.ask(synthetic.sample_scene(random.Random(0)), "size", random.Random(0))


def test_tokenizer_corpus_is_the_rendered_demo_chat_without_placeholders():
    record = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}]}
    (text,) = tokenizer_corpus([record], demo_chat_template())
    assert text == f"{DEMO_SYSTEM_PROMPT} USER: \nHow many? ASSISTANT: 2"


def test_demo_chat_template_only_changes_the_default_system_prompt():
    from transformers.utils.chat_template_utils import render_jinja_template

    from flashsloth.processing import DEFAULT_CHAT_TEMPLATE

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    (demo,), _ = render_jinja_template([messages], chat_template=demo_chat_template(), add_generation_prompt=True)
    (default,), _ = render_jinja_template([messages], chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert demo.startswith(DEMO_SYSTEM_PROMPT + " ")
    assert demo[len(DEMO_SYSTEM_PROMPT) :] == default[default.index(" USER: ") :]


def test_bad_recipes_are_refused_before_any_work(tmp_path):
    check_recipe(demo_recipe_defaults())
    with pytest.raises(ValueError, match="encoder_steps must be at least 0.*stage2_learning_rate must be a positive"):
        check_recipe({**demo_recipe_defaults(), "encoder_steps": -1, "stage2_learning_rate": float("nan")})
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be a multiple of processes \(4\)"):
        check_recipe({**demo_recipe_defaults(), "batch_size": 10, "encoder_batch_size": 64, "processes": 4})
    with pytest.raises(ValueError, match=r"unknown recipe keys \['stage3_steps'\]"):
        check_recipe({**demo_recipe_defaults(), "stage3_steps": 1})
    result = run_flashsloth("demo-train", str(tmp_path / "model"), "--stage2-turns", "6")
    assert result.returncode == 2 and "stage2_turns is at most 5" in result.stderr
    assert not (tmp_path / "model").exists()
    for bad_mix in ("color:2,colour:1", "color:2,color:1", "color:-1", "color", "count:0"):
        with pytest.raises(ValueError, match="stage2_kind_mix: a kind mix"):
            check_recipe({**demo_recipe_defaults(), "stage2_kind_mix": bad_mix})
    # The varied recipe: its own keys, checked the same way; the synthetic recipe does not take them.
    varied = recipe_defaults("varied")
    check_recipe(varied)
    assert varied == {**demo_recipe_defaults(), **VARIED_RECIPE} and set(varied) - set(demo_recipe_defaults())
    with pytest.raises(ValueError, match=r"base_share is a probability \(0 to 1\), got 1.5.*stage2_turns must be 1"):
        check_recipe({**varied, "base_share": 1.5, "stage2_turns": 2})
    with pytest.raises(ValueError, match="training_data must be one of"):
        check_recipe({**varied, "training_data": "photos"})
    result = run_flashsloth("demo-train", str(tmp_path / "model"), "--base-share", "0.5")
    assert result.returncode == 2 and "--base-share needs --recipe varied" in result.stderr
    # SAP's windows tile the patch grid 3 x 3 (9 visual tokens): 64 px of 8 px patches is an 8 x 8 grid.
    with pytest.raises(ValueError, match=r"image_size \(64\) must be a multiple of patch_size \(8\) whose"):
        check_recipe({**demo_recipe_defaults(), "image_size": 64})
    check_recipe({**demo_recipe_defaults(), "image_size": 96})
    with pytest.raises(ValueError, match="anneal_samples must be at least 1.*anneal_kind_mix: a kind mix"):
        check_recipe({**demo_recipe_defaults(), "anneal_kind_mix": "position", "anneal_samples": 0})


def test_kind_mix_sets_the_share_of_each_question_kind(tmp_path):
    kinds = kind_cycle("color:1, position:3")
    assert kinds == ("color", "position", "position", "position")
    data = synthetic.generate_dataset(tmp_path, 40, stage=2, seed=3, image_size=32, kinds=kinds, turns=2)
    records = json.loads(data.read_text())
    assert collections.Counter(record["kind"] for record in records) == {"color": 10, "position": 30}
    # The follow-up question is of the other kind, however often a kind repeats in the cycle.
    follow_up_answers = {"color": synthetic.POSITIONS, "position": tuple(synthetic.COLORS)}
    two_turn = [record for record in records if len(record["conversations"]) == 4]
    assert two_turn and all(len(record["conversations"]) in (2, 4) for record in records)
    assert all(record["conversations"][3]["value"] in follow_up_answers[record["kind"]] for record in two_turn)
    assert kind_cycle(demo_recipe_defaults()["stage2_kind_mix"])


def test_score_table_lists_every_kind():
    scores = {"per_kind": dict.fromkeys(synthetic.QUESTION_KINDS, 0.5), "overall": 0.5}
    table = format_scores({"m": scores})
    assert table.count("|") == 3 * (len(synthetic.QUESTION_KINDS) + 3) and "50.0%" in table


@pytest.mark.parametrize("recipe_name", ["synthetic", "varied"])
def test_recipe_data_written_by_worker_processes_is_the_serial_data(tmp_path, monkeypatch, recipe_name):
    recipe = {**recipe_defaults(recipe_name), "image_size": 16, "stage1_samples": 5, "stage2_samples": 9}
    recipe["anneal_samples"] = 4
    by_workers = generate_recipe_data(recipe, tmp_path / "workers")
    # Where the platform cannot fork, the same datasets are written one after another in this process.
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    serial = generate_recipe_data(recipe, tmp_path / "serial")
    for written, expected, folder in zip(by_workers, serial, ("stage1", "stage2", "stage2-anneal")):
        assert written == tmp_path / "workers" / folder / "data.json"
        assert expected == tmp_path / "serial" / folder / "data.json"
        assert filecmp.cmp(written, expected, shallow=False)
        names = sorted(path.name for path in (written.parent / "images").iterdir())
        # One image per record; with varied data, questions about one drawing share it (`questions_per_image`).
        assert names == sorted({Path(record["image"]).name for record in json.loads(written.read_text())})
        match, mismatch, errors = filecmp.cmpfiles(
            written.parent / "images", expected.parent / "images", names, shallow=False
        )
        assert match == names and not mismatch and not errors
        with Image.open(written.parent / "images" / names[0]) as image:
            assert image.size == (16, 16)
    assert generate_recipe_data({**recipe, "anneal_steps": 0}, tmp_path / "no-end-phase")[2] is None


TINY_RECIPE_ARGUMENTS = (
    "--encoder-steps", "2", "--encoder-batch-size", "4", "--stage1-samples", "16", "--stage1-steps", "2",
    "--stage2-samples", "20", "--stage2-steps", "2", "--batch-size", "4", "--anneal-samples", "8",
    "--anneal-steps", "2", "--text-layers", "2", "--vision-layers", "2", "--vocab-size", "300",
)  # fmt: skip


def test_tiny_recipe_trains_and_saves_a_loadable_model(tmp_path):
    result = run_flashsloth(
        "demo-train", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), *TINY_RECIPE_ARGUMENTS
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["demo_recipe"]["stage2_steps"] == 2 and config["text_config"]["num_hidden_layers"] == 2
    assert config["demo_recipe"]["processes"] == 2
    assert (tmp_path / "work" / "run-stage2-anneal" / "model" / "config.json").is_file()
    # Two data-parallel processes of one thread each, in one DDP group: only its first process reported each of the 4
    # stages (two processes training alone would both have), and a second run gives the same weights bit for bit.
    assert (result.stdout + result.stderr).count("'train_runtime'") == 4, result.stdout[-2000:]
    second = run_flashsloth(
        "demo-train", str(tmp_path / "second"), "--work-dir", str(tmp_path / "work-second"), *TINY_RECIPE_ARGUMENTS
    )
    assert second.returncode == 0, second.stderr[-2000:]
    weights = [tmp_path / run / "model.safetensors" for run in ("model", "second")]
    assert filecmp.cmp(*weights, shallow=False)
    again = run_flashsloth("demo-train", str(tmp_path / "model"))
    assert again.returncode == 2 and "--force" in again.stderr
    # The ablation reuses a variant trained beforehand only when its recipe is the ablation's.
    (tmp_path / "ablation").mkdir()
    (tmp_path / "model").rename(tmp_path / "ablation" / "full")
    ablation = run_flashsloth("demo-ablation", str(tmp_path / "ablation"), "--per-kind", "1")
    assert ablation.returncode == 2, ablation.stderr[-2000:]
    assert "trained with another recipe" in ablation.stderr and "stage2_steps" in ablation.stderr
    recipe = {key: value for key, value in config["demo_recipe"].items() if key not in ("variant", "train_seconds")}
    model, processor, seconds = trained_variant(tmp_path / "ablation" / "full", "full", recipe)
    assert seconds == config["demo_recipe"]["train_seconds"] and model.config.text_config.num_hidden_layers == 2
    assert trained_variant(tmp_path / "ablation" / "no-embq", "no-embq", recipe) is None


def test_tiny_varied_recipe_trains_on_the_geometry_labels(tmp_path):
    result = run_flashsloth(
        "demo-train", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), "--recipe", "varied",
        "--questions-per-image", "2", *TINY_RECIPE_ARGUMENTS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    recipe = json.loads((tmp_path / "model" / "config.json").read_text())["demo_recipe"]
    assert recipe["training_data"] == "varied" and recipe["base_share"] == VARIED_RECIPE["base_share"]
    questions = json.loads((tmp_path / "work" / "stage2" / "data.json").read_text())
    assert all("center" in obj for record in questions for obj in record["objects"])
    assert (result.stdout + result.stderr).count("'train_runtime'") == 4, result.stdout[-2000:]


# The embedded model itself.


def test_demo_model_was_trained_with_the_default_recipe():
    # `flashsloth demo-train OUT` with no options reproduces the embedded model.
    with open(DEMO_MODEL_DIR / "config.json") as file:
        recipe = json.load(file)["demo_recipe"]
    assert recipe.pop("variant") == "full" and recipe.pop("train_seconds") <= 30 * 60
    assert recipe == demo_recipe_defaults()


def test_demo_model_is_small_and_carries_the_current_remote_code():
    size = sum(path.stat().st_size for path in DEMO_MODEL_DIR.rglob("*") if path.is_file())
    assert size <= 25 * 2**20
    for name, source in REMOTE_CODE_SOURCES.items():
        assert filecmp.cmp(DEMO_MODEL_DIR / name, source, shallow=False), f"demo/model/{name} is stale: re-save it"


def test_demo_model_answers_held_out_questions_better_than_chance():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    scores = evaluate(model, processor, per_kind=40, seed=1234)
    # Guessing gives 1/6 (colour), 1/3 (shape), 1/4 (count), 1/2 (exist), 1/4 (position): 30 % overall. The README
    # reports the model's accuracy on 500 questions of each kind (99.8 % overall, every kind 99.4 % or more); these 40
    # per kind scored 99.0 % (100 % of every kind but existence: 38 of 40).
    assert scores["overall"] >= 0.97, scores
    assert all(scores["per_kind"][kind] >= 0.9 for kind in synthetic.QUESTION_KINDS), scores


def test_demo_model_visual_tokens_say_where_their_object_is():
    # Stage 0's position head: a linear probe tells from a slot's visual token alone (not from its index) which slot it
    # is. Without the head such probes scored 20-28 % (chance: 25 %) and position questions stayed at guessing level.
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from flashsloth.training.encoder import slot_windows

    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    rng = random.Random(11)
    scenes = [synthetic.sample_scene(rng) for _ in range(240)]
    images = [synthetic.render_scene(scene, 2 * processor.image_processor.size["height"], rng) for scene in scenes]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_embeds = model.model.get_image_features(pixel_values.flatten(0, -4)).image_embeds
    image_embeds = image_embeds.reshape(len(scenes), -1, image_embeds.shape[-1])  # (scenes, 9 tokens, hidden)
    windows = slot_windows(model.config.patch_grid_size // model.config.pooling_window)
    scene_slots = [
        (index, synthetic.POSITIONS.index(obj.position)) for index, scene in enumerate(scenes) for obj in scene.objects
    ]
    features = torch.stack([image_embeds[index, windows[slot]] for index, slot in scene_slots])
    slots = torch.tensor([slot for _, slot in scene_slots])
    train = len(slots) * 2 // 3
    features = (features - features[:train].mean(0)) / (features[:train].std(0) + 1e-6)
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], len(synthetic.POSITIONS))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(probe(features[:train]), slots[:train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (probe(features[train:]).argmax(-1) == slots[train:]).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_demo_command_answers_offline():
    result = run_flashsloth("demo", "--seed", "5", "--kind", "count")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    # The scene is of one of the robustness families, the question in a training or a held-out wording.
    assert any(f"({family} drawing, " in lines["Scene"] for family in FAMILIES), lines["Scene"]
    count_wordings = TRAINING_TEMPLATES["count"] + HELD_OUT_TEMPLATES["count"]
    assert lines["Question"].strip() in count_wordings
    assert lines["Answer"].strip() in {"1", "2", "3", "4"}
    assert "(correct)" in lines["Expected"] or "(wrong)" in lines["Expected"]
    assert Path(lines["Image"].strip()).is_file()
    # The main job's output stays clean: no import-time noise of optional packages (torchao) on stderr.
    assert "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr[-2000:]


def test_demo_command_answers_questions_not_about_shapes_without_a_crash():
    result = run_flashsloth("demo", "--seed", "7", "--question", "What is the capital of France?")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["Question"].strip() == "What is the capital of France?" and "Answer" in lines
    assert "Expected" not in lines  # no true answer to a question the scene does not answer


def test_demo_command_on_a_missing_image_is_a_clear_error():
    result = run_flashsloth("demo", "--image", "does-not-exist.png")
    assert result.returncode == 2 and "image not found" in result.stderr


def test_ask_without_model_uses_the_demo_model(tmp_path):
    """`flashsloth ask` without --model loads the embedded model (which answers a colour question with a colour)."""
    rng = random.Random(9)
    scene = synthetic.Scene((synthetic.SceneObject("circle", "red", "large", "left"),), (255, 255, 255))
    synthetic.render_scene(scene, 288, rng).save(tmp_path / "red_circle.png")
    result = run_flashsloth("ask", str(tmp_path / "red_circle.png"), "--question", "What color is the circle?")
    assert result.returncode == 0, result.stderr[-2000:]
    assert synthetic.normalize_answer(result.stdout) in synthetic.COLORS
