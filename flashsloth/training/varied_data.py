"""
Training data on varied drawings: the demo recipe's captions and questions on scenes of `varied_scenes`, every
property drawn at random, in training wordings.

A training scene is the `synthetic` generator's own layout (`base_share` of them) or varies each property of
`varied_scenes.FAMILIES` (free positions, sizes, backgrounds, outlines, anti-aliasing, blur, JPEG, aspect ratio,
colour shades) with probability `vary_share`, so that single variations and all of them at once both occur.
Questions use `TRAINING_TEMPLATES`, which hold `synthetic`'s wordings and others, never the evaluation's
`HELD_OUT_TEMPLATES`. Records are written as `synthetic.generate_dataset` writes them, with the scene's geometry
(each object's centre and radius, the canvas size) for stage 0's patch labels:

    {"id": "qa-000001", "image": "images/qa-000001.png", "kind": "count", "width": 288, "height": 144,
     "objects": [{"shape": "circle", "color": "red", "size": "small", "position": None,
                  "center": [0.41, 0.52], "radius": 0.06, "outline_width": 2}, ...],
     "conversations": [...]}
"""

import json
import os
import random
from pathlib import Path

from PIL import Image

from .synthetic import CAPTION_PROMPTS, NUMBER_WORDS, POSITIONS, QUESTION_KINDS, QUESTION_TEMPLATES, ask
from .varied_scenes import FAMILIES, HELD_OUT_TEMPLATES, VariedScene, render_varied_scene, sample_scene_varying


# `synthetic`'s wordings first (the base evaluation asks those), then other training wordings: none of them is a
# held-out one (a test checks), and some have no question mark, as users write.
TRAINING_TEMPLATES = {
    "color": QUESTION_TEMPLATES["color"]
    + ("Which colour is the {shape}?", "The {shape} is what color?", "Name the color of the {shape}.",
       "{shape} color?"),
    "shape": QUESTION_TEMPLATES["shape"]
    + ("What is the shape of the {color} object?", "Which shape has the color {color}?", "Name the {color} shape.",
       "What {color} shape is there?"),
    "count": QUESTION_TEMPLATES["count"]
    + ("How many objects are there?", "What is the number of shapes?", "How many shapes are in the picture?",
       "Number of shapes?"),
    "exist": QUESTION_TEMPLATES["exist"]
    + ("Is there {article} {color} {shape} in the image?", "Do you see {article} {color} {shape}?",
       "Does the picture show {article} {color} {shape}?", "Any {color} {shape}?"),
    "position": QUESTION_TEMPLATES["position"]
    + ("Where is the {color} {shape} in the image?", "Which side is the {color} {shape} on?",
       "Where can you find the {color} {shape}?", "Position of the {color} {shape}?"),
}  # fmt: skip
# The properties a training scene may vary (every family but the layout itself, the wording and the mix).
VARIED_PROPERTIES = tuple(family for family in FAMILIES if family not in ("base", "wording", "mixed"))
# Training drawings at these short sides when the aspect ratio varies (the evaluation's go up to 320 pixels: every
# drawing is squashed to the encoder's square input, and large ones only cost drawing time).
TRAINING_SHORT_SIDES = (96, 128, 160, 192)
# An object at most this radius (of the short side) is "small" in captions, as `synthetic`'s small size (0.075).
SMALL_RADIUS = 0.1


def sample_training_scene(rng: random.Random, base_share: float, vary_share: float) -> VariedScene:
    """A training scene: `synthetic`'s layout in `base_share` of the draws, else each property varied with
    probability `vary_share` (anti-aliasing in half of the scenes that vary it, as the `mixed` family)."""
    if rng.random() < base_share:
        return sample_scene_varying(rng, set())
    varies = {name for name in VARIED_PROPERTIES if rng.random() < vary_share}
    return sample_scene_varying(rng, varies, antialias_share=0.5, short_sides=TRAINING_SHORT_SIDES)


def size_word(radius: float) -> str:
    return "small" if radius <= SMALL_RADIUS else "large"


def describe_varied(scene: VariedScene) -> str:
    """The stage-1 caption, as `synthetic.describe` words it: objects in `POSITIONS` order of their side, those on no
    side (the middle, a corner) last and without a position, left to right."""

    def order(obj):
        return (POSITIONS.index(obj.position) if obj.position else len(POSITIONS), obj.center[0], obj.center[1])

    parts = []
    for obj in sorted(scene.objects, key=order):
        where = ""
        if obj.position:
            where = f" {'at the' if obj.position in ('top', 'bottom') else 'on the'} {obj.position}"
        parts.append(f"a {size_word(obj.radius)} {obj.color} {obj.shape}{where}")
    count = len(scene.objects)
    head = "There is one shape" if count == 1 else f"There are {NUMBER_WORDS[count]} shapes"
    return f"{head}: {', '.join(parts)}."


def scene_record(scene: VariedScene, sample_id: str, kind: str, turn: tuple[str, str]) -> dict:
    """A record as `synthetic` writes it, with the scene's geometry (stage 0 labels the patches from it)."""
    question, answer = turn
    return {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "kind": kind,
        "width": scene.width,
        "height": scene.height,
        "objects": [
            {
                "shape": obj.shape,
                "color": obj.color,
                "size": size_word(obj.radius),
                "position": obj.position,
                "center": [round(value, 5) for value in obj.center],
                "radius": round(obj.radius, 5),
                "outline_width": obj.outline_width,
            }
            for obj in scene.objects
        ],
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def generate_varied_dataset(
    output_dir: str | os.PathLike,
    num_samples: int,
    stage: int,
    seed: int = 0,
    save_size: int = 96,
    kinds: tuple[str, ...] = QUESTION_KINDS,
    base_share: float = 0.25,
    vary_share: float = 0.7,
    questions_per_image: int = 1,
    json_name: str = "data.json",
) -> Path:
    """
    Write `num_samples` training samples on varied scenes (images squashed to `save_size` squares with bicubic
    resampling, as the processor resizes them: it gives the same pixel values for the stored image as for the
    drawing) and return the JSON path; the same arguments give byte-identical files. Stage 1: captions; stage 2: one
    question per record, of the kind `kinds` cycles to, up to `questions_per_image` consecutive records about one
    drawing (fewer drawings to make; a kind without an unambiguous question on it starts a new drawing).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (captions) or 2 (questions), got {stage!r}")
    if num_samples < 1 or questions_per_image < 1:
        raise ValueError(
            f"num_samples and questions_per_image must be at least 1, got {num_samples} and {questions_per_image}"
        )
    if not (0 <= base_share <= 1 and 0 <= vary_share <= 1):
        raise ValueError(f"base_share and vary_share are probabilities (0 to 1), got {base_share}, {vary_share}")
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"flashsloth-varied-{seed}-{stage}")
    records, scene, image_path, used = [], None, None, 0
    for index in range(num_samples):
        sample_id = f"{'caption' if stage == 1 else 'qa'}-{index:06d}"
        kind = "caption" if stage == 1 else kinds[index % len(kinds)]
        turn = None
        if stage == 2 and scene is not None and used < questions_per_image:
            turn = ask(scene, kind, rng, templates=TRAINING_TEMPLATES)
        if turn is None:
            while turn is None:
                scene = sample_training_scene(rng, base_share, vary_share)
                turn = (
                    (rng.choice(CAPTION_PROMPTS), describe_varied(scene))
                    if stage == 1
                    else ask(scene, kind, rng, templates=TRAINING_TEMPLATES)
                )
            image = render_varied_scene(scene, rng).resize((save_size, save_size), resample=Image.Resampling.BICUBIC)
            image_path = f"images/{sample_id}.png"
            image.save(output_dir / image_path, compress_level=1)
            used = 0
        used += 1
        records.append({**scene_record(scene, sample_id, kind, turn), "image": image_path})
    json_path = output_dir / json_name
    json_path.write_text(json.dumps(records, indent=1))
    return json_path


def held_out_wordings() -> set[str]:
    return {template for templates in HELD_OUT_TEMPLATES.values() for template in templates}
