# Copyright 2025 The FlashSloth package authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image processor for FlashSloth.

This file is remote code: it is copied beside the `config.json` of a checkpoint and imported by the dynamic module
loader of transformers, so it only imports the standard library, numpy, PIL, torch and transformers.

It reproduces the preprocessing of the original FlashSloth code bit for bit: every resize is Pillow's
`Image.resize(..., BICUBIC)` on the uint8 RGB image, followed by `x / 255` and `(x - mean) / std` in float32.
"""

import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, load_image
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_tensor


IMAGE_ASPECT_RATIOS = ("square", "pad")
# HD mode cuts the padded image, resized to twice the crop size, into a 2x2 grid of crops.
HD_GRID_SIDE = 2
# Channel counts an array image may have: grey, RGB, RGBA (alpha is dropped like PIL's `convert("RGB")`).
VALID_NUM_CHANNELS = (1, 3, 4)


class FlashSlothImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    image_aspect_ratio (`str`, *optional*, defaults to `"square"`):
        How a single-crop image is brought to the crop size. `"square"` squashes it (the released checkpoints),
        `"pad"` first pads it to a square with the mean colour. Ignored when `image_hd=True`.
    image_hd (`bool`, *optional*, defaults to `False`):
        Whether to cut every image into 5 crops (FlashSloth-HD): the squashed global view, then the mean-padded image
        resized to twice the crop size and cut into top-left, top-right, bottom-left and bottom-right crops.
    """

    image_aspect_ratio: str | None
    image_hd: bool | None


def make_flat_image_list(images: Any) -> list:
    """
    Flatten an image input into a list with one entry per image, keeping the order.

    Accepts a single image (PIL image, numpy array or torch tensor with 2 or 3 dimensions, or a path/URL string), a
    4-D array or tensor holding a batch of images, and (nested) lists or tuples of those, e.g. one list per sample.
    """
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in make_flat_image_list(item)]
    if isinstance(images, (str, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray) or is_torch_tensor(images):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(
            f"An image array must have 2 (height, width), 3 (with a channel axis) or 4 (a batch) dimensions, got "
            f"shape {tuple(images.shape)}."
        )
    raise ValueError(
        f"Unsupported image type {type(images).__name__}. Pass PIL images, numpy arrays, torch tensors, or paths/URLs "
        "as strings (or lists of them)."
    )


def _check_image_aspect_ratio(image_aspect_ratio: str) -> None:
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(
            f"`image_aspect_ratio` must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}. The released "
            "FlashSloth checkpoints use 'square'."
        )


def _check_image_size(width: int, height: int) -> None:
    """Reject empty images and images larger than PIL's decompression-bomb limit."""
    if width <= 0 or height <= 0:
        raise ValueError(f"Got an empty image of size {width}x{height} (width x height); every image needs pixels.")
    max_pixels = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"The image has {width}x{height} = {width * height} pixels, more than PIL's decompression-bomb limit "
            f"`PIL.Image.MAX_IMAGE_PIXELS` = {max_pixels}. Downscale the image first or, if you trust its source, "
            "raise the limit (`PIL.Image.MAX_IMAGE_PIXELS = None` disables it)."
        )


def _open_image_file(path: str) -> Image.Image:
    """Open a local image file like transformers' `load_image` (EXIF orientation applied) but keep its mode, so that
    `_pil_to_rgb` sees 16-bit greyscale before any 8-bit conversion."""
    image = Image.open(path)
    image.load()
    return ImageOps.exif_transpose(image)


def _load_image_source(source: str) -> Image.Image:
    """Open an image given as a local path, URL or base64 string, turning every failure into a `ValueError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _open_image_file(source) if os.path.isfile(source) else load_image(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"The image {source[:200]!r} exceeds PIL's decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS` = "
            f"{Image.MAX_IMAGE_PIXELS}: {error} Downscale the image first or, if you trust its source, raise the "
            "limit."
        ) from error
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not read the image {source[:200]!r}: {error}. Pass the path of an existing, complete image file "
            "(PNG, JPEG, ...), a PIL image or an array."
        ) from error
    except Exception as error:  # network failures (the HTTP client's own errors) when `source` is a URL
        if not source.startswith(("http://", "https://")):
            raise
        raise ValueError(
            f"Could not read the image {source[:200]!r}: {error}. Check the network, or download the image and "
            "pass a local path or a PIL image (offline, only local images work)."
        ) from error


def _wide_grey_to_uint8(image: Image.Image) -> Image.Image:
    """
    Bring a 16/32-bit greyscale image (modes `I;16*`, `I`) to 8 bits, which PIL's `convert("RGB")` would clip at 255.
    `I;16*` images (16-bit PNG/TIFF) are scaled from [0, 65535]; `I` images are kept as they are when their values
    lie in [0, 255] (8-bit data) and scaled from [0, 65535] otherwise.
    """
    values = np.asarray(image).astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if image.mode == "I" and low >= 0 and high <= 255:
        return Image.fromarray(values.astype(np.uint8))
    if low < 0 or high > 65535:
        raise ValueError(
            f"A {image.mode!r} image has values in [{low}, {high}]; greyscale images must hold 8-bit [0, 255] or "
            "16-bit [0, 65535] values. Rescale it to one of these ranges (or convert it to 'L') first."
        )
    return Image.fromarray(np.round(values / 257).astype(np.uint8))


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """
    `image.convert("RGB")`, exactly like the original code: an alpha channel is dropped, not composited. 16-bit
    greyscale images are scaled to 8 bits first (see `_wide_grey_to_uint8`).
    """
    _check_image_size(*image.size)
    try:
        if image.mode == "I" or image.mode.startswith("I;16"):
            image = _wide_grey_to_uint8(image)
        return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not read or convert the PIL image (mode {image.mode!r}, size {image.size}) to RGB: {error}. If it "
            "comes from a file, check that the file is complete (e.g. re-download it)."
        ) from error


def _channel_axis(shape: tuple[int, ...], channels_first: bool, input_data_format: str | None) -> int:
    """The channel axis of a 3-D image array: given by `input_data_format`, or the preferred layout if it fits."""
    if input_data_format is not None:
        return 0 if ChannelDimension(input_data_format) == ChannelDimension.FIRST else 2
    preferred, other = (0, 2) if channels_first else (2, 0)
    for axis in (preferred, other):
        if shape[axis] in VALID_NUM_CHANNELS:
            return axis
    raise ValueError(
        f"Could not find a channel axis of size {VALID_NUM_CHANNELS} in an image of shape {shape}. Pass grey (1), RGB "
        "(3) or RGBA (4) images as (height, width, channels) or (channels, height, width)."
    )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert pixel values to uint8: integers must lie in [0, 255], floats in [0, 1] (rounded to the nearest)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"Integer images must have values in [0, 255], got [{array.min()}, {array.max()}] ({array.dtype})."
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"Float images must have finite values in [0, 1], got [{array.min()}, {array.max()}]. Pass uint8 "
                "arrays for values in [0, 255]."
            )
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"Unsupported image dtype {array.dtype}; use uint8, an integer type, bool, or float in [0, 1].")


def _array_to_rgb(image: Any, input_data_format: str | None) -> Image.Image:
    """
    Convert a numpy array or torch tensor to an RGB PIL image with PIL's `convert("RGB")` semantics (grey is
    replicated, alpha is dropped). numpy arrays are read as channels-last and torch tensors as channels-first unless
    only the other layout fits or `input_data_format` says otherwise.
    """
    channels_first = is_torch_tensor(image)
    if channels_first:
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if image.ndim == 2:
        image = image[..., None]
    else:
        image = np.moveaxis(image, _channel_axis(image.shape, channels_first, input_data_format), -1)
    height, width, num_channels = image.shape
    if num_channels not in VALID_NUM_CHANNELS:
        raise ValueError(
            f"Images must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {num_channels} (shape {image.shape} as "
            "height, width, channels)."
        )
    _check_image_size(width, height)
    image = _to_uint8(image)
    if num_channels == 1:
        image = np.repeat(image, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(image[..., :3]))


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad an image to a square of side max(width, height) with `fill`, the image centred (offsets rounded down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    max_pixels = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and side * side > max_pixels:  # e.g. a 1x50000 strip would need 7.5 GB
        raise ValueError(
            f"Padding the {width}x{height} image to a square ('pad' and HD modes) needs {side}x{side} = {side * side} "
            f"pixels, more than `PIL.Image.MAX_IMAGE_PIXELS` = {max_pixels}. Crop the image to a less extreme aspect "
            "ratio, use `image_aspect_ratio='square'` without HD, or raise the limit if you trust the image."
        )
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class FlashSlothImageProcessor(PilBackend):
    r"""
    Constructs a FlashSloth image processor (PIL backend, no torchvision needed).

    Every image becomes one crop of `size` (default 384x384), or five crops with `image_hd=True`. The output holds
    `pixel_values` of shape `(total_crops, 3, height, width)`, the crops of all images concatenated in order, and
    `image_num_crops` with the number of crops of each image.

    Accepted images: PIL images of any mode (converted with `convert("RGB")`, so alpha is dropped without compositing;
    16-bit greyscale is scaled to 8 bits rather than clipped),
    numpy arrays (channels-last by default) and torch tensors (channels-first by default) of uint8/integer values in
    [0, 255], bool, or floats in [0, 1], with 1, 3 or 4 channels or none (grey), 4-D batches of those, paths, URLs or
    base64 strings, and (nested) lists of all these.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 384, "width": 384}`):
            Size of every crop.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            Pillow resampling filter used for every resize.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Rescale factor.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `image_mean` and `image_std`.
        image_mean (`tuple[float, float, float]`, *optional*, defaults to `(0.5, 0.5, 0.5)`):
            Normalisation mean; `int(255 * mean)` is also the padding colour.
        image_std (`tuple[float, float, float]`, *optional*, defaults to `(0.5, 0.5, 0.5)`):
            Normalisation standard deviation.
        image_aspect_ratio (`str`, *optional*, defaults to `"square"`):
            `"square"` or `"pad"`, see [`FlashSlothImageProcessorKwargs`].
        image_hd (`bool`, *optional*, defaults to `False`):
            Whether to make 5 crops per image, see [`FlashSlothImageProcessorKwargs`].
    """

    valid_kwargs = FlashSlothImageProcessorKwargs
    model_input_names = ["pixel_values", "image_num_crops"]

    size = {"height": 384, "width": 384}
    resample = PILImageResampling.BICUBIC
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    image_aspect_ratio = "square"
    image_hd = False

    def __init__(self, **kwargs: Unpack[FlashSlothImageProcessorKwargs]):
        super().__init__(**kwargs)
        _check_image_aspect_ratio(self.image_aspect_ratio)

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list:
        """Flatten the input into one entry per image; loading and conversion happen in `process_image`."""
        return make_flat_image_list(images)

    def process_image(
        self, image: Any, input_data_format: str | ChannelDimension | None = None, **kwargs
    ) -> Image.Image:
        """Load or convert one input image to an RGB PIL image, validating its size."""
        if isinstance(image, str):
            image = _load_image_source(image)
        if isinstance(image, Image.Image):
            return _pil_to_rgb(image)
        return _array_to_rgb(image, input_data_format)

    def _validate_preprocess_kwargs(
        self, size: SizeDict | None = None, image_aspect_ratio: str | None = None, **kwargs
    ) -> None:
        super()._validate_preprocess_kwargs(size=size, **kwargs)
        _check_image_aspect_ratio(image_aspect_ratio)
        if size is None or not (size.height and size.width):
            raise ValueError(f"`size` must give the crop size as {{'height': h, 'width': w}}, got {size}.")

    def crop_image(
        self,
        image: Image.Image,
        size: SizeDict,
        resample: PILImageResampling,
        image_mean: tuple[float, ...],
        image_aspect_ratio: str,
        image_hd: bool,
    ) -> list[Image.Image]:
        """
        Cut one RGB image into its crops, each of `size`.

        - `square`: the image squashed to `size` (aspect ratio ignored).
        - `pad`: the image padded to a square with the mean colour, then squashed.
        - HD: the squashed global view, then the padded image resized to `HD_GRID_SIDE` times `size` and cut row-major
          into top-left, top-right, bottom-left and bottom-right crops. `image_aspect_ratio` is ignored.
        """
        crop_width, crop_height = size.width, size.height
        fill = tuple(int(255 * mean) for mean in image_mean)
        if not image_hd:
            if image_aspect_ratio == "pad":
                image = expand_to_square(image, fill)
            return [image.resize((crop_width, crop_height), resample=resample)]

        global_view = image.resize((crop_width, crop_height), resample=resample)
        grid = expand_to_square(image, fill).resize(
            (crop_width * HD_GRID_SIDE, crop_height * HD_GRID_SIDE), resample=resample
        )
        tiles = [
            grid.crop((left, top, left + crop_width, top + crop_height))
            for top in range(0, crop_height * HD_GRID_SIDE, crop_height)
            for left in range(0, crop_width * HD_GRID_SIDE, crop_width)
        ]
        return [global_view, *tiles]

    def _preprocess(
        self,
        images: list[Image.Image],
        size: SizeDict,
        resample: PILImageResampling,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        image_aspect_ratio: str,
        image_hd: bool,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Cut every image into crops and turn them into normalised float32 `pixel_values`."""
        crops, image_num_crops = [], []
        for image in images:
            image_crops = self.crop_image(image, size, resample, image_mean, image_aspect_ratio, image_hd)
            crops.extend(image_crops)
            image_num_crops.append(len(image_crops))

        if crops:
            pixels = np.stack([np.asarray(crop) for crop in crops]).transpose(0, 3, 1, 2)
        else:
            pixels = np.zeros((0, 3, size.height, size.width), dtype=np.uint8)
        # Rescaling in float64 then casting reproduces the original float32 values exactly.
        pixel_values = (pixels * (rescale_factor if do_rescale else 1.0)).astype(np.float32)
        if do_normalize:
            mean = np.asarray(image_mean, dtype=np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(image_std, dtype=np.float32).reshape(1, -1, 1, 1)
            pixel_values = (pixel_values - mean) / std

        data = {"pixel_values": pixel_values, "image_num_crops": np.asarray(image_num_crops, dtype=np.int64)}
        return BatchFeature(data=data, tensor_type=return_tensors)


FlashSlothImageProcessor.register_for_auto_class()

__all__ = ["FlashSlothImageProcessor", "FlashSlothImageProcessorKwargs", "make_flat_image_list"]
