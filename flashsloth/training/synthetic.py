"""
Synthetic visual question answering data: scenes of one to four coloured shapes, deterministic by seed.

A scene places each object in its own slot of a diamond (left, right, top, bottom), so every object has exactly one
position word. Stage-1 samples caption the scene; stage-2 samples ask one of five kinds of question with a one-word
answer. Both are written as LLaVA-format JSON plus a folder of PNG images:

    {"id": "qa-000001", "image": "images/qa-000001.png", "kind": "count",
     "objects": [{"shape": "circle", "color": "red", "size": "small", "position": "left"}, ...],
     "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"},
                       {"from": "gpt", "value": "3"}]}
"""

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm


SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
QUESTION_KINDS = ("color", "shape", "count", "exist", "position")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# Slot centres as fractions of the image side: the middle of the edge-adjacent cells of a 3x3 grid.
SLOT_CENTERS = {"left": (1 / 6, 1 / 2), "right": (5 / 6, 1 / 2), "top": (1 / 2, 1 / 6), "bottom": (1 / 2, 5 / 6)}
# Object radius as a fraction of the image side (a grid cell is 1/3 wide), and the largest centre jitter.
SIZE_RADII = {"small": 0.075, "large": 0.13}
MAX_JITTER = 0.03

QUESTION_TEMPLATES = {
    "color": ("What color is the {shape}?", "Which color does the {shape} have?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?"),
    "count": ("How many shapes are there?", "How many objects are in the image?"),
    "exist": ("Is there {article} {color} {shape}?", "Does the image contain {article} {color} {shape}?"),
    "position": ("Where is the {color} {shape}?", "In which part of the image is the {color} {shape}?"),
}
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Give a short description of the image.")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]


def sample_scene(rng: random.Random) -> Scene:
    """One to four objects with random shape, colour and size, each in a different slot; a light grey background."""
    positions = rng.sample(POSITIONS, rng.randint(1, len(POSITIONS)))
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), position)
        for position in sorted(positions, key=POSITIONS.index)
    )
    grey = rng.randint(225, 255)
    return Scene(objects, (grey, grey, grey))


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene on an `image_size` square; `rng` jitters each object's centre by a few pixels."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        center_x, center_y = SLOT_CENTERS[obj.position]
        center_x = (center_x + rng.uniform(-MAX_JITTER, MAX_JITTER)) * image_size
        center_y = (center_y + rng.uniform(-MAX_JITTER, MAX_JITTER)) * image_size
        radius = SIZE_RADII[obj.size] * image_size
        box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=color)
        elif obj.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(center_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return image


def describe(scene: Scene) -> str:
    """The stage-1 caption, e.g. `There are two shapes: a small red circle on the left, a large blue square at the top.`"""
    parts = [
        f"a {obj.size} {obj.color} {obj.shape} {'at the' if obj.position in ('top', 'bottom') else 'on the'} "
        f"{obj.position}"
        for obj in scene.objects
    ]
    count = len(scene.objects)
    head = "There is one shape" if count == 1 else f"There are {NUMBER_WORDS[count]} shapes"
    return f"{head}: {', '.join(parts)}."


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def ask(scene, kind: str, rng: random.Random, templates: dict | None = None) -> tuple[str, str] | None:
    """
    A `(question, answer)` of the given kind about the scene, or `None` when the scene has no unambiguous question of
    that kind (e.g. a colour question needs a shape that occurs exactly once; a position question, an object with a
    position). `templates` replaces `QUESTION_TEMPLATES` (the wordings per kind).
    """
    if kind not in QUESTION_KINDS:
        raise ValueError(f"Unknown question kind {kind!r}; choose one of {QUESTION_KINDS}.")
    template = rng.choice((templates or QUESTION_TEMPLATES)[kind])
    objects = scene.objects
    if kind == "count":
        return template, str(len(objects))
    if kind == "color":
        unique = [obj for obj in objects if sum(other.shape == obj.shape for other in objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        return template.format(shape=target.shape), target.color
    if kind == "shape":
        unique = [obj for obj in objects if sum(other.color == obj.color for other in objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        return template.format(color=target.color), target.shape
    if kind == "exist":
        present = {(obj.color, obj.shape) for obj in objects}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return template.format(article=article(color), color=color, shape=shape), "yes"
        absent = [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in present]
        # Half of the absent pairs share the colour or the shape of a present object: "no" must not be guessable.
        near = [pair for pair in absent if any(pair[0] == c or pair[1] == s for c, s in present)]
        color, shape = rng.choice(near if near and rng.random() < 0.5 else absent)
        return template.format(article=article(color), color=color, shape=shape), "no"
    unique = [obj for obj in objects if sum((o.color, o.shape) == (obj.color, obj.shape) for o in objects) == 1]
    unique = [obj for obj in unique if obj.position is not None]
    if not unique:
        return None
    target = rng.choice(unique)
    return template.format(color=target.color, shape=target.shape), target.position


def make_sample(index: int, stage: int, rng: random.Random, kinds: tuple[str, ...] = QUESTION_KINDS, turns: int = 1):
    """
    One `(scene, record)`: a caption sample for stage 1; for stage 2 a question of a kind cycled by `index` (the
    record's `"kind"`), followed, when `turns > 1`, by questions of up to `turns - 1` other kinds about the same scene
    in random order (a kind with no unambiguous question on the scene is left out).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (captions) or 2 (questions), got {stage!r}")
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns!r}")
    sample_id = f"{'caption' if stage == 1 else 'qa'}-{index:06d}"
    while True:
        scene = sample_scene(rng)
        if stage == 1:
            kind, turn_pairs = "caption", [(rng.choice(CAPTION_PROMPTS), describe(scene))]
            break
        kind = kinds[index % len(kinds)]
        first = ask(scene, kind, rng)
        if first is not None:
            turn_pairs = [first]
            if turns > 1:
                others = [other for other in dict.fromkeys(kinds) if other != kind]
                rng.shuffle(others)
                follow_ups = (ask(scene, other, rng) for other in others[: turns - 1])
                turn_pairs += [pair for pair in follow_ups if pair is not None]
            break
    conversations = []
    for turn, (question, answer) in enumerate(turn_pairs):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if turn == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    record = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "kind": kind,
        "objects": [asdict(obj) for obj in scene.objects],
        "conversations": conversations,
    }
    return scene, record


def generate_dataset(
    output_dir: str | os.PathLike,
    num_samples: int,
    stage: int,
    seed: int = 0,
    image_size: int = 144,
    kinds: tuple[str, ...] = QUESTION_KINDS,
    json_name: str = "data.json",
    turns: int = 1,
    save_size: int | None = None,
) -> Path:
    """
    Write `num_samples` samples (images under `output_dir/images/`, records in `output_dir/json_name` with image paths
    relative to `output_dir`) and return the JSON path. The same arguments always give byte-identical files. Stage 2
    cycles through `kinds` for the first question of each sample, so every kind gets the same number of them (within
    one); `turns > 1` adds follow-up questions of other kinds (see `make_sample`). With `save_size`, the images are
    drawn at `image_size` and stored downscaled to `save_size` with bicubic resampling, as the FlashSloth image
    processor resizes them: a processor of that size gives the same pixel values for the stored image as for the
    drawing, and reading the smaller file is cheaper at every training step.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns!r}")
    if save_size is not None and not 0 < save_size <= image_size:
        raise ValueError(f"save_size must be between 1 and image_size ({image_size}), got {save_size!r}")
    output_dir = Path(output_dir)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"flashsloth-synthetic-{seed}-{stage}")
    records = []
    for index in tqdm(range(num_samples), desc=f"stage-{stage} samples", leave=False):
        scene, record = make_sample(index, stage, rng, kinds, turns)
        image = render_scene(scene, image_size, rng)
        if save_size is not None:
            image = image.resize((save_size, save_size), resample=Image.Resampling.BICUBIC)
        # zlib's fastest level: the same pixels; the demo recipe's 84000 samples took 51 s to generate instead of 81.
        image.save(output_dir / record["image"], compress_level=1)
        records.append(record)
    json_path = output_dir / json_name
    json_path.write_text(json.dumps(records, indent=1))
    return json_path


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding spaces or final full stop: what exact-match compares."""
    return text.strip().lower().rstrip(".").strip()
