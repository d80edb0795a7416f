"""The bad-input catalogue: every malformed input a user can hand the processor, the model, the pipeline or the CLI
raises one documented exception type whose message says what was wrong and what to do (the "Bad input" table of docs/reliability.md
lists the same case ids). Inputs that look odd but are valid (16-bit PNG, CMYK JPEG, a 1x10000 strip) work and give
the right pixels.

The converter's cases live in tests/test_conversion.py; that table lists them too.
"""

import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image

from flashsloth import FlashSlothForConditionalGeneration
from flashsloth.cli import build_parser
from flashsloth.cli_errors import CliError
from flashsloth.processing import FlashSlothImageProcessor
from model_helpers import IMAGE_SIZE, save_tiny_checkpoint, tiny_config, tiny_model_for_processor
from processing_helpers import make_tiny_processor


RELIABILITY_PAGE = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
PROMPT = "USER: <image>\nWhat is in the picture?<learnable> ASSISTANT:"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def user_message(text: str, num_images: int = 1) -> list[dict]:
    images = [{"type": "image", "image": noise_image(30, 20, seed=index)} for index in range(num_images)]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


class Context:
    """What the cases run against, built on first use and shared by the module: a tiny processor and model, the same
    saved as a checkpoint folder, and a pipeline loaded from it as remote code. `tmp_path` and `monkeypatch` are the
    current test's."""

    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch

    def __init__(self, directory: Path):
        self.directory = directory

    @cached_property
    def processor(self):
        return make_tiny_processor(image_size=IMAGE_SIZE, num_image_tokens_per_crop=4)

    @cached_property
    def model(self) -> FlashSlothForConditionalGeneration:
        return tiny_model_for_processor(self.processor)

    @cached_property
    def checkpoint(self) -> Path:
        save_tiny_checkpoint(self.directory / "checkpoint", self.processor)
        return self.directory / "checkpoint"

    @cached_property
    def pipe(self):
        from transformers import pipeline

        return pipeline("image-text-to-text", model=str(self.checkpoint), trust_remote_code=True)

    @cached_property
    def image_file(self) -> Path:
        noise_image(40, 30).save(self.directory / "image.png")
        return self.directory / "image.png"

    def inputs(self) -> dict:
        """Fresh processor outputs for one prompt with one image."""
        return dict(self.processor(images=[noise_image(40, 30)], text=PROMPT))

    def run_model(self, **changes):
        with torch.no_grad():
            return self.model(**{**self.inputs(), **changes})

    def run_cli(self, *argv: str):
        """A `flashsloth` command up to its handler; `main` prints the CliError as one line and exits 2."""
        args = build_parser().parse_args([str(argument) for argument in argv])
        return args.handler(args)


@dataclass(frozen=True)
class BadInput:
    case: str
    layer: str
    exception: type[BaseException]
    message: str  # regular expression over the message: what was wrong and what to do
    trigger: Callable[[Context], object]


def truncated_png(context: Context):
    data = png_bytes(noise_image(80, 60))
    path = context.tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    context.processor(images=[str(path)], text=PROMPT)


def truncated_png_opened(context: Context):
    data = png_bytes(noise_image(80, 60))
    context.processor(images=[Image.open(io.BytesIO(data[: len(data) // 2]))], text=PROMPT)


def decompression_bomb(context: Context):
    context.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = context.tmp_path / "large.png"
    noise_image(60, 60).save(path)
    context.processor(images=[str(path)], text=PROMPT)


def thin_strip_padded(context: Context):
    context.processor(images=[Image.new("RGB", (1, 10000))], text=PROMPT, image_hd=True)


def grey_out_of_range(context: Context):
    wide = Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I")
    context.processor(images=[wide], text=PROMPT)


def prompt_too_long(context: Context):
    context.monkeypatch.setattr(context.processor.tokenizer, "model_max_length", 40)
    context.processor(images=[noise_image(20, 20)], text=PROMPT + " Tell me more" * 10)


def pipeline_placeholder_in_message(context: Context):
    context.pipe(text=user_message("What does <image> mean?", num_images=0), max_new_tokens=2)


def pipeline_prompt_image_mismatch(context: Context):
    context.pipe(images=[noise_image(20, 20), noise_image(30, 30)], text=PROMPT, max_new_tokens=2)


def pipeline_url_offline(context: Context):
    context.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    content = [{"type": "image", "url": "http://127.0.0.1:9/x.png"}, {"type": "text", "text": "?"}]
    messages = [{"role": "user", "content": content}]
    context.pipe(text=messages, max_new_tokens=2)


def broken_query_block(context: Context):
    inputs = context.inputs()
    ids = inputs["input_ids"].clone()
    ids[0, -1] = context.processor.query_token_id  # a tenth query token after the block
    context.run_model(input_ids=ids)


CATALOGUE = [
    # Processor
    BadInput(
        "truncated-png", "processor", ValueError, r"Could not read the image .*truncated.*complete image file",
        truncated_png,
    ),
    BadInput(
        "truncated-png-object", "processor", ValueError, r"truncated.*check that the file is complete",
        truncated_png_opened,
    ),
    BadInput(
        "empty-image", "processor", ValueError, r"empty image of size 0x0.*every image needs pixels",
        lambda context: context.processor(images=[Image.new("RGB", (0, 0))], text=PROMPT),
    ),
    BadInput(
        "decompression-bomb", "processor", ValueError, r"decompression-bomb limit.*Downscale the image",
        decompression_bomb,
    ),
    BadInput(
        "thin-strip-padded", "processor", ValueError, r"Padding the 1x10000 image.*Crop the image",
        thin_strip_padded,
    ),
    BadInput(
        "grey-out-of-range", "processor", ValueError, r"values in \[70000, 70000\].*Rescale it",
        grey_out_of_range,
    ),
    BadInput(
        "nan-image-array", "processor", ValueError, r"finite values in \[0, 1\].*Pass uint8 arrays",
        lambda context: context.processor(images=[np.full((8, 8, 3), np.nan, np.float32)], text=PROMPT),
    ),
    BadInput(
        "image-count-mismatch", "processor", ValueError,
        r"Got 2 image\(s\) but the text has 1 <image>.*Put one <image>",
        lambda context: context.processor(images=[noise_image(9, 9), noise_image(9, 9)], text=PROMPT),
    ),
    BadInput(
        "placeholder-without-image", "processor", ValueError, r"no images were passed\. Pass one image per <image>",
        lambda context: context.processor(text=PROMPT),
    ),
    BadInput(
        "image-typed-in-message", "chat template", jinja2.TemplateError,
        r"contains the placeholder '<image>'.*remove or rephrase",
        lambda context: context.processor.apply_chat_template(user_message("Is <image> a tag?")),
    ),
    BadInput(
        "query-typed-in-message", "chat template", jinja2.TemplateError,
        r"contains the placeholder '<learnable>'.*remove or rephrase",
        lambda context: context.processor.apply_chat_template(user_message("Say <learnable>")),
    ),
    BadInput(
        "unknown-content-type", "chat template", jinja2.TemplateError, r"hold 'text' and 'image' items, got .*'video'",
        lambda context: context.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
        ),
    ),
    BadInput(
        "image-in-assistant-message", "chat template", jinja2.TemplateError, r"Images go in user messages.*'assistant'",
        lambda context: context.processor.apply_chat_template(
            user_message("Hi", num_images=0) + [{"role": "assistant", "content": [{"type": "image"}]}]
        ),
    ),
    BadInput(
        "empty-conversation", "chat template", ValueError, r"conversation is empty: pass a list of messages",
        lambda context: context.processor.apply_chat_template([]),
    ),
    BadInput(
        "prompt-too-long", "processor", ValueError,
        r"more than the model accepts.*Shorten the text or pass fewer images",
        prompt_too_long,
    ),
    # Model
    BadInput(
        "pixel-values-wrong-shape", "model", ValueError,
        r"pixel_values must be a floating point tensor of shape \(num_crops, 3, 84, 84\); "
        r"got \(1, 3, 50, 84\).*processor",
        lambda context: context.run_model(pixel_values=torch.zeros(1, 3, 50, IMAGE_SIZE)),
    ),
    BadInput(
        "pixel-values-wrong-dtype", "model", ValueError, r"floating point tensor.*torch\.uint8.*processor",
        lambda context: context.run_model(pixel_values=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)),
    ),
    BadInput(
        "pixel-values-nan", "model", ValueError, r"NaN or infinite.*FlashSloth processor",
        lambda context: context.run_model(pixel_values=torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), float("nan"))),
    ),
    BadInput(
        "image-tokens-mismatch", "model", ValueError, r"holds 0 image tokens.*gives? 4.*one placeholder",
        lambda context: context.run_model(
            input_ids=context.processor(text="USER: no image here ASSISTANT:")["input_ids"],
            attention_mask=None,
            instruction_mask=None,
        ),
    ),
    BadInput(
        "image-num-crops-mismatch", "model", ValueError,
        r"adds up to 2 crops but pixel_values holds 1.*processor returned",
        lambda context: context.run_model(image_num_crops=torch.tensor([2])),
    ),
    BadInput(
        "broken-query-block", "model", ValueError, r"exactly 9 consecutive query tokens.*FlashSloth processor",
        broken_query_block,
    ),
    BadInput(
        "token-ids-out-of-vocabulary", "model", ValueError, r"outside the vocabulary.*-200 image placeholder",
        lambda context: context.run_model(
            input_ids=torch.tensor([[5, -200, 7]]),
            attention_mask=None,
            pixel_values=None,
            image_num_crops=None,
            instruction_mask=None,
        ),
    ),
    BadInput(
        "unknown-attn-implementation", "model", ValueError, r'attn_implementation="flash_attn"` is not supported.*sdpa',
        lambda context: FlashSlothForConditionalGeneration.from_pretrained(
            context.checkpoint, attn_implementation="flash_attn"
        ),
    ),
    BadInput(
        "flash-attn-not-installed", "model", ImportError, r"FlashAttention2.*package.*installed",
        lambda context: FlashSlothForConditionalGeneration(tiny_config(attn_implementation="flash_attention_2")),
    ),
    BadInput(
        "invalid-config", "model", ValueError, r"Invalid FlashSlothConfig: pooling_window=4 must divide",
        lambda context: tiny_config(pooling_window=4),
    ),
    # Pipeline
    BadInput(
        "pipeline-placeholder-in-message", "pipeline", jinja2.TemplateError,
        r"placeholder '<image>'.*remove or rephrase",
        pipeline_placeholder_in_message,
    ),
    BadInput(
        "pipeline-image-count-mismatch", "pipeline", ValueError, r"Got 2 image\(s\) but the text has 1 <image>",
        pipeline_prompt_image_mismatch,
    ),
    BadInput(
        "pipeline-url-offline", "pipeline", ValueError,
        r"Could not read the image 'http://127\.0\.0\.1:9/x\.png'.*network",
        pipeline_url_offline,
    ),
    # CLI
    BadInput(
        "cli-missing-image", "CLI", CliError, r"^image not found: .*missing\.png$",
        lambda context: context.run_cli("ask", "--model", context.checkpoint, context.tmp_path / "missing.png",
                                        "--question", "What?"),
    ),
    BadInput(
        "cli-not-an-image", "CLI", CliError, r"^cannot read the image .*notes\.png",
        lambda context: context.run_cli("ask", "--model", context.checkpoint, write_text(context, "notes.png", "hello"),
                                        "--question", "What?"),
    ),
    BadInput(
        "cli-missing-model", "CLI", CliError, r"^model folder not found: ",
        lambda context: context.run_cli("ask", "--model", f"{context.tmp_path}/nothing/", context.image_file,
                                        "--question", "What?"),
    ),
    BadInput(
        "cli-not-a-checkpoint", "CLI", CliError, r"^cannot load the model .*: Unrecognized processing class",
        lambda context: context.run_cli(
            "ask", "--model", f"{context.tmp_path}/", context.image_file, "--question", "?"
        ),
    ),
    BadInput(
        "cli-bad-max-new-tokens", "CLI", CliError, r"^--max-new-tokens must be at least 1, got 0$",
        lambda context: context.run_cli("ask", "--model", context.checkpoint, context.image_file, "--question", "?",
                                        "--max-new-tokens", "0"),
    ),
]
# Odd but valid inputs: they work, with the pixels checked by the tests below.
WORKING_CASES = ["16-bit-png", "16-bit-rgb-png", "cmyk-jpeg", "thin-strip-square"]


def write_text(context: Context, name: str, text: str) -> Path:
    (context.tmp_path / name).write_text(text)
    return context.tmp_path / name


@pytest.fixture(scope="module")
def shared_context(tmp_path_factory) -> Context:
    return Context(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture
def context(shared_context, tmp_path, monkeypatch) -> Context:
    shared_context.tmp_path, shared_context.monkeypatch = tmp_path, monkeypatch
    return shared_context


def test_catalogue_ids_are_unique_and_cover_every_layer():
    ids = [case.case for case in CATALOGUE] + WORKING_CASES
    assert len(ids) == len(set(ids)) and len(CATALOGUE) >= 15
    assert {case.layer for case in CATALOGUE} == {"processor", "chat template", "model", "pipeline", "CLI"}


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.case for case in CATALOGUE])
def test_bad_input_raises_its_documented_error(context, case):
    if case.case == "flash-attn-not-installed":
        try:
            import flash_attn  # noqa: F401

            pytest.skip("flash-attn is installed here")
        except ImportError:
            pass
    with pytest.raises(case.exception) as error:
        case.trigger(context)
    assert type(error.value) is case.exception
    assert re.search(case.message, str(error.value), flags=re.DOTALL), str(error.value)


def test_the_model_still_answers_after_every_bad_input(context):
    # No bad input leaves state behind: the shared model and processor give what a fresh model gives.
    fresh = tiny_model_for_processor(context.processor)
    inputs = context.inputs()
    with torch.no_grad():
        torch.testing.assert_close(context.model(**inputs).logits, fresh(**inputs).logits, rtol=0, atol=0)


def readme_table_rows() -> list[list[str]]:
    text = RELIABILITY_PAGE.read_text(encoding="utf-8")
    section = text.split("\n## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_readme_table_lists_every_case():
    rows = readme_table_rows()
    documented = {row[0].strip("`"): row for row in rows}
    tested_here = {case.case: case for case in CATALOGUE}
    assert set(tested_here) | set(WORKING_CASES) == {case for case, row in documented.items() if row[1] != "converter"}
    for case in CATALOGUE:
        row = documented[case.case]
        assert row[1] == case.layer and f"`{case.exception.__name__}`" in row[2], row
    for case in WORKING_CASES:
        assert documented[case][2] == "works", documented[case]


# Odd but valid inputs


def png_16_bit(channels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): `channels` `(height, width, planes)` uint16."""
    height, width = channels.shape[:2]
    rows = b"".join(b"\x00" + channels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def pixels(image, **kwargs) -> np.ndarray:
    return FlashSlothImageProcessor(**kwargs)(image, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("image_hd", [False, True])
def test_16_bit_png_is_scaled_to_8_bits(tmp_path, image_hd):  # case 16-bit-png
    grey_8 = np.random.default_rng(0).integers(0, 256, (30, 50), dtype=np.uint8)
    grey_16 = grey_8.astype(np.uint16) * 257  # the same picture at 16 bits: x * 65535 / 255
    path = tmp_path / "grey16.png"
    path.write_bytes(png_16_bit(grey_16[..., None], color_type=0))
    assert Image.open(path).mode == "I;16"
    expected = pixels(Image.fromarray(grey_8).convert("RGB"), image_hd=image_hd)
    np.testing.assert_array_equal(pixels(str(path), image_hd=image_hd), expected)
    np.testing.assert_array_equal(pixels(Image.open(path), image_hd=image_hd), expected)


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):  # case 16-bit-rgb-png
    rgb_8 = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_16_bit(rgb_8.astype(np.uint16) * 257, color_type=2))
    np.testing.assert_array_equal(pixels(str(path)), pixels(Image.fromarray(rgb_8)))


def test_cmyk_jpeg_gives_the_colours_of_the_rgb_picture(tmp_path):  # case cmyk-jpeg
    rows, columns = np.mgrid[0:60, 0:90]
    rgb = np.stack([columns * 2.5, rows * 4, 255 - columns - rows], axis=-1).clip(0, 255).astype(np.uint8)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    difference = np.abs(pixels(str(path)) - pixels(Image.fromarray(rgb)))
    assert difference.mean() < 0.02 and difference.max() < 0.15  # JPEG loss only: inverted CMYK would be ~1


def test_thin_strip_in_square_mode(context):  # case thin-strip-square
    strip = Image.new("RGB", (1, 10000), (255, 0, 51))
    inputs = context.processor(images=[strip], text=PROMPT)
    expected = (np.array([255, 0, 51], dtype=np.float32) / 255 - 0.5) / 0.5
    values = inputs["pixel_values"].numpy()
    assert values.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(values[0], np.broadcast_to(expected[:, None, None], values[0].shape), atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(context.model(**inputs).logits).all()
