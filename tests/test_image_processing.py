"""Tests of FlashSlothImageProcessor: bit-exactness against the original preprocessing, input types, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from processing_helpers import (
    PARITY_FIXTURES_DIR,
    PROCESSOR_FIXTURES_DIR,
    crops_to_pixel_values,
    require_shared,
)
from safetensors.numpy import load_file

from flashsloth.processing import FlashSlothImageProcessor


MODE_SETTINGS = {
    "square": {"image_hd": False, "image_aspect_ratio": "square"},
    "pad": {"image_hd": False, "image_aspect_ratio": "pad"},
    "hd": {"image_hd": True},
}
TOLERANCE = 1e-6


def processor_fixture_cases() -> list[tuple[str, str]]:
    manifest_path = PROCESSOR_FIXTURES_DIR / "manifest.json"
    if not manifest_path.exists():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"shared data not available: {manifest_path}"))]
    manifest = json.loads(manifest_path.read_text())
    return [(name, mode) for name, entry in manifest["images"].items() for mode in entry["modes"]]


def random_rgb_image(width: int = 37, height: int = 23, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixel_values(image, **kwargs) -> np.ndarray:
    return FlashSlothImageProcessor(**kwargs)(image, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize(("image_name", "mode"), processor_fixture_cases())
def test_matches_original_preprocessing_bit_exactly(image_name, mode):
    entry = json.loads((PROCESSOR_FIXTURES_DIR / "manifest.json").read_text())["images"][image_name]
    expected = crops_to_pixel_values([PROCESSOR_FIXTURES_DIR / name for name in entry["modes"][mode]["files"]])

    output = FlashSlothImageProcessor(**MODE_SETTINGS[mode])(
        Image.open(PROCESSOR_FIXTURES_DIR / entry["source"]), return_tensors="pt"
    )

    assert output["pixel_values"].dtype == torch.float32
    assert tuple(output["pixel_values"].shape) == tuple(entry["modes"][mode]["original_pixel_values_shape"])
    assert output["image_num_crops"].tolist() == [entry["modes"][mode]["crops"]]
    assert np.abs(output["pixel_values"].numpy() - expected).max() <= TOLERANCE


@pytest.mark.parametrize(("variant", "image_hd"), [("base", False), ("hd", True)])
def test_matches_parity_fixture_pixel_values(variant, image_hd):
    folder = require_shared(PARITY_FIXTURES_DIR / variant)
    expected = load_file(folder / "reference.safetensors")["pixel_values"].reshape(-1, 3, 384, 384)

    output = FlashSlothImageProcessor(image_hd=image_hd)(Image.open(folder / "image.png"), return_tensors="np")

    assert output["pixel_values"].shape == expected.shape == ((5 if image_hd else 1), 3, 384, 384)
    assert np.abs(output["pixel_values"] - expected).max() <= TOLERANCE


# 16-bit greyscale (`I;16`) is scaled to 8 bits instead of clipped: see tests/test_bad_inputs.py.
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "I", "F", "CMYK", "YCbCr", "RGBA"])
@pytest.mark.parametrize("image_hd", [False, True])
def test_pil_modes_follow_convert_rgb(mode, image_hd):
    image = random_rgb_image().convert(mode)
    assert image.mode == mode

    np.testing.assert_array_equal(
        pixel_values(image, image_hd=image_hd), pixel_values(image.convert("RGB"), image_hd=image_hd)
    )


def test_rgba_drops_alpha_without_compositing():
    transparent_red = Image.new("RGBA", (40, 30), (200, 10, 30, 0))

    values = pixel_values(transparent_red)

    expected = (np.array([200, 10, 30], dtype=np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(values[0, :, 0, 0], expected, atol=TOLERANCE)
    assert np.ptp(values[0], axis=(1, 2)).max() == 0


def test_pad_mode_pads_with_the_mean_colour():
    white = Image.new("RGB", (300, 100), (255, 255, 255))

    values = pixel_values(white, image_aspect_ratio="pad")[0]

    grey = (127 / 255 - 0.5) / 0.5
    np.testing.assert_allclose(values[:, 0, 192], grey, atol=TOLERANCE)  # top band is padding
    np.testing.assert_allclose(values[:, 192, 192], 1.0, atol=TOLERANCE)  # centre is the image


@pytest.mark.parametrize("image_hd", [False, True])
def test_array_inputs_equal_pil_input(image_hd):
    image = random_rgb_image()
    rgb = np.array(image)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, dtype=np.uint8)], axis=-1)
    grey = np.array(image.convert("L"))
    expected = pixel_values(image, image_hd=image_hd)
    expected_grey = pixel_values(image.convert("L"), image_hd=image_hd)

    same_as_rgb = {
        "numpy HWC uint8": rgb,
        "numpy CHW uint8": rgb.transpose(2, 0, 1),
        "numpy HWC float": rgb.astype(np.float32) / 255,
        "numpy HWC int64": rgb.astype(np.int64),
        "numpy HWC RGBA": rgba,
        "torch CHW uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch HWC uint8": torch.from_numpy(rgb),
        "torch CHW float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "torch CHW float64": torch.from_numpy(rgb.astype(np.float64) / 255).permute(2, 0, 1),
    }
    for name, array in same_as_rgb.items():
        np.testing.assert_array_equal(pixel_values(array, image_hd=image_hd), expected, err_msg=name)
    for name, array in {
        "numpy HW": grey,
        "numpy HW1": grey[..., None],
        "torch 1HW": torch.from_numpy(grey)[None],
    }.items():
        np.testing.assert_array_equal(pixel_values(array, image_hd=image_hd), expected_grey, err_msg=name)
    mask = grey > 128
    np.testing.assert_array_equal(pixel_values(mask), pixel_values(Image.fromarray(mask).convert("1")))


def test_input_data_format_overrides_the_default_layout():
    rgb = np.asarray(random_rgb_image(width=4, height=3))  # (3, 4, 3): both layouts fit

    channels_last = pixel_values(rgb, input_data_format="channels_last")
    channels_first = pixel_values(rgb.transpose(2, 0, 1), input_data_format="channels_first")

    np.testing.assert_array_equal(channels_last, channels_first)


def test_batches_of_mixed_sizes_and_nesting_keep_order():
    images = [random_rgb_image(37, 23, seed=0), random_rgb_image(500, 80, seed=1), random_rgb_image(20, 90, seed=2)]
    processor = FlashSlothImageProcessor(image_hd=True)
    singles = [processor(image, return_tensors="np")["pixel_values"] for image in images]

    for batch in ([images[0], [images[1], images[2]]], [[images[0]], [], [images[1], images[2]]], tuple(images)):
        output = processor(batch, return_tensors="pt")
        assert output["image_num_crops"].tolist() == [5, 5, 5]
        np.testing.assert_array_equal(output["pixel_values"].numpy(), np.concatenate(singles))

    stacked = np.stack([np.asarray(random_rgb_image(37, 23, seed=seed)) for seed in range(3)])
    output = FlashSlothImageProcessor()(stacked, return_tensors="np")
    assert output["pixel_values"].shape == (3, 3, 384, 384)
    np.testing.assert_array_equal(output["pixel_values"][0], pixel_values(images[0])[0])


def test_no_images_gives_empty_tensors():
    output = FlashSlothImageProcessor()([], return_tensors="pt")

    assert output["pixel_values"].shape == (0, 3, 384, 384)
    assert output["pixel_values"].dtype == torch.float32
    assert output["image_num_crops"].shape == (0,)
    assert output["image_num_crops"].dtype == torch.int64


def test_reads_image_files(tmp_path):
    image = random_rgb_image()
    image.save(tmp_path / "image.png")

    np.testing.assert_array_equal(pixel_values(str(tmp_path / "image.png")), pixel_values(image))


def test_custom_crop_size_and_no_normalisation():
    output = FlashSlothImageProcessor(size={"height": 84, "width": 84}, image_hd=True, do_normalize=False)(
        random_rgb_image(), return_tensors="np"
    )

    assert output["pixel_values"].shape == (5, 3, 84, 84)
    assert output["pixel_values"].min() >= 0 and output["pixel_values"].max() <= 1


def test_save_and_load_round_trip(tmp_path):
    processor = FlashSlothImageProcessor(image_hd=True, image_aspect_ratio="pad")
    processor.save_pretrained(tmp_path)

    reloaded = FlashSlothImageProcessor.from_pretrained(tmp_path)

    assert reloaded.to_dict() == processor.to_dict()
    assert reloaded.image_hd is True and reloaded.image_aspect_ratio == "pad"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.new("RGB", (0, 10)), "empty image"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty image"),
        (np.zeros((10, 10, 2), dtype=np.uint8), "channel axis"),
        (torch.zeros(5, 10, 10, dtype=torch.uint8), "channel axis"),
        (np.zeros((2, 2, 10, 10, 3), dtype=np.uint8), "dimensions"),
        (np.full((10, 10, 3), 1.5, dtype=np.float32), r"\[0, 1\]"),
        (np.full((10, 10, 3), np.nan, dtype=np.float32), r"\[0, 1\]"),
        (np.full((10, 10, 3), 300, dtype=np.int32), r"\[0, 255\]"),
        (np.zeros((10, 10, 3), dtype=np.complex64), "dtype"),
        ({"image": 1}, "Unsupported image type"),
        (b"not an image", "Unsupported image type"),
        (None, "Unsupported image type"),
        ("/no/such/image.png", "Could not read"),
        (Image.new("La", (4, 4)), "convert"),
    ],
)
def test_invalid_images_raise_value_error(image, message):
    with pytest.raises(ValueError, match=message):
        FlashSlothImageProcessor()(image)


def test_unreadable_file_raises_value_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")

    with pytest.raises(ValueError, match="Could not read"):
        FlashSlothImageProcessor()(str(path))


def test_decompression_bomb_raises_value_error(tmp_path, monkeypatch):
    image = random_rgb_image(width=60, height=60)
    image.save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    for too_large in (image, np.asarray(image), str(tmp_path / "large.png")):  # 3600 pixels: PIL raises (> 2x limit)
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            FlashSlothImageProcessor()(too_large)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3600 pixels: PIL only warns (< 2x limit)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        FlashSlothImageProcessor()(str(tmp_path / "large.png"))


def test_invalid_aspect_ratio_raises_value_error():
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        FlashSlothImageProcessor(image_aspect_ratio="anyres")
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        FlashSlothImageProcessor()(random_rgb_image(), image_aspect_ratio="anyres")
