"""
Synthetic scenes that vary what `synthetic` fixes: where the shapes are and how big, the background, filled or
outlined shapes, anti-aliasing, blur, JPEG compression, the canvas's aspect ratio and resolution, the colours' shades
and the questions' wording.

A *family* varies one property alone and keeps the rest as `synthetic` draws it (four fixed slots, two sizes, light
grey, filled, the demo palette, the training wordings); `mixed` varies them all at once. The families measure what a
model learnt (`flashsloth demo-eval --robustness`) and the mixed scenes are meant to train on. Held out for
evaluation: the question wordings of `HELD_OUT_TEMPLATES`, which no family but `wording` and `mixed` asks.

Positions on a free layout are the side of the image the object's centre lies on (left, right, top, bottom), asked
only where one side clearly dominates; questions keep `synthetic`'s rule that each has exactly one right answer.
"""

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from .synthetic import COLORS, POSITIONS, QUESTION_KINDS, SHAPES, SIZE_RADII, SLOT_CENTERS, ask


FAMILIES = (
    "base",
    "position",
    "size",
    "background",
    "outline",
    "antialias",
    "blur",
    "jpeg",
    "aspect",
    "palette",
    "wording",
    "mixed",
)
# Other shades of each colour name: CSS's named colours and common variants, as other drawing code would pick them.
COLOR_SHADES = {
    "red": ((255, 0, 0), (200, 20, 40), (230, 60, 50), (178, 34, 34)),
    "green": ((0, 128, 0), (34, 139, 34), (50, 190, 70), (0, 170, 0)),
    "blue": ((0, 0, 255), (30, 60, 200), (65, 105, 225), (0, 90, 255)),
    "yellow": ((255, 255, 0), (255, 215, 0), (250, 230, 50), (240, 200, 0)),
    "purple": ((128, 0, 128), (148, 0, 211), (120, 60, 200), (160, 32, 160)),
    "orange": ((255, 165, 0), (255, 140, 0), (255, 120, 30), (240, 150, 40)),
}
HELD_OUT_TEMPLATES = {
    "color": ("What is the color of the {shape}?", "Tell me the colour of the {shape}."),
    "shape": ("What kind of shape is {color}?", "The {color} object is which shape?"),
    "count": ("How many shapes do you see?", "Count the objects in the picture."),
    "exist": ("Can you see {article} {color} {shape}?", "Is {article} {color} {shape} in the picture?"),
    "position": ("Where is the {color} {shape} located?", "On which side is the {color} {shape}?"),
}
ASPECT_RATIOS = (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0)  # width / height, from 1:2 to 2:1
SHORT_SIDES = (96, 144, 224, 320)
MIN_RADIUS, MAX_RADIUS = 0.04, 0.25  # of the short side: shapes from about 4 % to 25 % of it (as half-widths)
# Free positions: the centre must lie this far (in image fractions) from the middle along the dominant axis, and that
# axis must dominate the other by this factor, for the position to have one answer.
POSITION_MARGIN, POSITION_DOMINANCE = 0.12, 1.6


@dataclass(frozen=True)
class VariedObject:
    shape: str
    color: str
    position: str | None  # None where no side clearly dominates: no position question about it
    center: tuple[float, float]  # fractions of the width and height
    radius: float  # fraction of the short side
    rgb: tuple[int, int, int]
    outline_width: int  # 0: filled


@dataclass(frozen=True)
class VariedScene:
    objects: tuple[VariedObject, ...]
    width: int
    height: int
    background: str  # white, black, grey, colour, gradient, noise, light-grey
    background_colors: tuple[tuple[int, int, int], ...]
    antialias: bool
    blur: float  # Gaussian radius in pixels, 0 for none
    jpeg_quality: int | None


def side_of(center: tuple[float, float]) -> str | None:
    """The side of the image a centre lies on, or None when no side clearly dominates."""
    dx, dy = center[0] - 0.5, center[1] - 0.5
    if abs(dx) >= POSITION_DOMINANCE * abs(dy) and abs(dx) >= POSITION_MARGIN:
        return "left" if dx < 0 else "right"
    if abs(dy) >= POSITION_DOMINANCE * abs(dx) and abs(dy) >= POSITION_MARGIN:
        return "top" if dy < 0 else "bottom"
    return None


def _free_layout(rng: random.Random, count: int, aspect: float, radii: list[float]) -> list[tuple[float, float]]:
    """Centres anywhere in the image, each shape inside it, overlapping its neighbours by at most a tenth of the
    smaller radius (shapes may touch)."""
    short_x, short_y = (1 / aspect, 1.0) if aspect >= 1 else (1.0, aspect)  # the short side in width/height fractions
    for _ in range(200):
        centers = [
            (rng.uniform(r * short_x, 1 - r * short_x), rng.uniform(r * short_y, 1 - r * short_y)) for r in radii
        ]
        pixels = [(x / short_x, y / short_y) for x, y in centers]  # in short-side units
        if all(
            ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 >= ra + rb - 0.1 * min(ra, rb)
            for i, (a, ra) in enumerate(zip(pixels, radii))
            for b, rb in zip(pixels[i + 1 :], radii[i + 1 :])
        ):
            return centers
    raise RuntimeError("could not place the shapes without overlap; use fewer or smaller shapes")


def _background(rng: random.Random, kind: str) -> tuple[tuple[int, int, int], ...]:
    """The background's colours: one, or two for a gradient; far from every shape colour, so the shapes stay visible."""

    def far_from_shapes(rgb):
        shades = [shade for shades in COLOR_SHADES.values() for shade in shades] + list(COLORS.values())
        return min(sum((a - b) ** 2 for a, b in zip(rgb, shade)) ** 0.5 for shade in shades) > 110

    if kind == "light-grey":
        grey = rng.randint(225, 255)
        return ((grey, grey, grey),)
    if kind == "white":
        return ((255, 255, 255),)
    if kind == "black":
        dark = rng.randint(0, 25)
        return ((dark, dark, dark),)
    if kind in ("grey", "noise"):
        grey = rng.choice((rng.randint(40, 90), rng.randint(150, 255)))
        return ((grey, grey, grey),)
    colors = []
    while len(colors) < (2 if kind == "gradient" else 1):
        rgb = tuple(rng.randint(0, 255) for _ in range(3))
        if far_from_shapes(rgb):
            colors.append(rgb)
    return tuple(colors)


def sample_varied_scene(rng: random.Random, family: str) -> VariedScene:
    """One to four shapes, varied as `family` says (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {FAMILIES}.")
    varies = {family} if family != "mixed" else set(FAMILIES)
    return sample_scene_varying(rng, varies, antialias_share=0.5 if family == "mixed" else 1.0)


def sample_scene_varying(
    rng: random.Random, varies: set[str], antialias_share: float = 1.0, short_sides: tuple[int, ...] = SHORT_SIDES
) -> VariedScene:
    """One to four shapes with the properties named in `varies` (family names) drawn at random and the rest as
    `synthetic` draws them; an anti-aliased drawing in `antialias_share` of the scenes that vary anti-aliasing, and
    short sides from `short_sides` for those that vary the aspect ratio."""
    count = rng.randint(1, len(POSITIONS))
    aspect = rng.choice(ASPECT_RATIOS) if "aspect" in varies else 1.0
    short_side = rng.choice(short_sides) if "aspect" in varies else 144
    width, height = (
        (round(short_side * aspect), short_side) if aspect >= 1 else (short_side, round(short_side / aspect))
    )
    if "size" in varies or "position" in varies:
        radii = [rng.uniform(MIN_RADIUS, MAX_RADIUS if count <= 2 else 0.16) for _ in range(count)]
    else:
        radii = [SIZE_RADII[rng.choice(("small", "large"))] for _ in range(count)]
    if "position" in varies:
        centers = _free_layout(rng, count, aspect, radii)
        positions = [side_of(center) for center in centers]
    else:
        positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
        centers = [tuple(c + rng.uniform(-0.03, 0.03) for c in SLOT_CENTERS[position]) for position in positions]
        radii = [min(radius, 0.16) for radius in radii]  # a slot is a third of the side
    objects = []
    for center, radius, position in zip(centers, radii, positions):
        color = rng.choice(list(COLORS))
        rgb = rng.choice(COLOR_SHADES[color]) if "palette" in varies else COLORS[color]
        outline = rng.choice((0, rng.randint(1, 3), rng.randint(3, 8))) if "outline" in varies else 0
        objects.append(VariedObject(rng.choice(SHAPES), color, position, center, radius, rgb, outline))
    background = "light-grey"
    if "background" in varies:
        background = rng.choice(("white", "black", "grey", "colour", "gradient", "noise"))
    return VariedScene(
        objects=tuple(objects),
        width=width,
        height=height,
        background=background,
        background_colors=_background(rng, background),
        antialias="antialias" in varies and rng.random() < antialias_share,
        blur=rng.uniform(0.5, 1.5) if "blur" in varies and rng.random() < 0.8 else 0.0,
        jpeg_quality=rng.randint(20, 95) if "jpeg" in varies else None,
    )


def _canvas(scene: VariedScene, scale: int, rng: random.Random) -> Image.Image:
    width, height = scene.width * scale, scene.height * scale
    if scene.background == "gradient":
        (r0, g0, b0), (r1, g1, b1) = scene.background_colors
        ramp = Image.linear_gradient("L").resize((width, height))
        if rng.random() < 0.5:
            ramp = ramp.transpose(Image.Transpose.ROTATE_90).resize((width, height))
        return Image.composite(
            Image.new("RGB", (width, height), (r1, g1, b1)), Image.new("RGB", (width, height), (r0, g0, b0)), ramp
        )
    image = Image.new("RGB", (width, height), scene.background_colors[0])
    if scene.background == "noise":
        # Uniform grey noise from `rng` (PIL's `effect_noise` draws from C's global `rand()`, which no seed here sets:
        # the same scene gave other pixels in another process).
        noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
        image = Image.blend(image, noise, rng.uniform(0.08, 0.2))
    return image


def render_varied_scene(scene: VariedScene, rng: random.Random) -> Image.Image:
    """Draw the scene; anti-aliased scenes are drawn at 4x and downscaled, then blurred and JPEG-compressed as set."""
    scale = 4 if scene.antialias else 1
    image = _canvas(scene, scale, rng)
    draw = ImageDraw.Draw(image)
    short = min(scene.width, scene.height) * scale
    for obj in scene.objects:
        x, y = obj.center[0] * scene.width * scale, obj.center[1] * scene.height * scale
        r = obj.radius * short
        box = (x - r, y - r, x + r, y + r)
        style = {"outline": obj.rgb, "width": obj.outline_width * scale} if obj.outline_width else {"fill": obj.rgb}
        if obj.shape == "circle":
            draw.ellipse(box, **style)
        elif obj.shape == "square":
            draw.rectangle(box, **style)
        elif obj.outline_width:
            draw.line(
                [(x, box[1]), (box[2], box[3]), (box[0], box[3]), (x, box[1])],
                fill=obj.rgb,
                width=style["width"],
                joint="curve",
            )
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=obj.rgb)
    if scale > 1:
        image = image.resize((scene.width, scene.height), resample=Image.Resampling.LANCZOS)
    if scene.blur:
        image = image.filter(ImageFilter.GaussianBlur(scene.blur))
    if scene.jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=scene.jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def ask_varied(scene: VariedScene, kind: str, rng: random.Random, family: str) -> tuple[str, str] | None:
    """A `(question, answer)` of `kind` about the scene (see `synthetic.ask`), in the held-out wordings for the
    `wording` and `mixed` families; None when the scene has no unambiguous question of that kind."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"Unknown question kind {kind!r}; choose one of {QUESTION_KINDS}.")
    templates = HELD_OUT_TEMPLATES if family in ("wording", "mixed") else None
    return ask(scene, kind, rng, templates=templates)


def make_varied_sample(index: int, rng: random.Random, family: str, kind: str):
    """One `(image, record)` with a question of `kind` on a scene of `family` (a record as `synthetic` writes it, with
    its `"family"`)."""
    while True:
        scene = sample_varied_scene(rng, family)
        pair = ask_varied(scene, kind, rng, family)
        if pair is not None:
            break
    question, answer = pair
    record = {
        "id": f"{family}-{kind}-{index:06d}",
        "family": family,
        "kind": kind,
        "objects": [{"shape": o.shape, "color": o.color, "position": o.position} for o in scene.objects],
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }
    return render_varied_scene(scene, rng), record
