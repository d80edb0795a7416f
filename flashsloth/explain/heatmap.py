"""Where FlashSloth's query tokens look: EmbQ's attention over an image's patches, and its picture as a heat map."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass
class QueryAttentionMap:
    """
    EmbQ's attention for one image and question, averaged over its attention heads.

    Attributes:
        per_query (`torch.Tensor` of shape `(num_query_tokens, grid, grid)`): each query token's weights over the
            patch grid of the image's first crop (the whole image, squashed, also in HD), summing to at most 1 (the
            rest went to the other HD crops).
        heat (`torch.Tensor` of shape `(grid, grid)`): `per_query` averaged over the query tokens.
        instruction_tokens (`list[str]`): the instruction text EmbQ read, token by token.
        instruction_weights (`torch.Tensor` of shape `(num_query_tokens, len(instruction_tokens))`): each query token's
            weights over that text.
        image_size (`tuple[int, int]`): the image's (width, height).
        padded (`bool`): whether the processor padded the image to a square before squashing it (`pad` mode).
    """

    per_query: torch.Tensor
    heat: torch.Tensor
    instruction_tokens: list[str]
    instruction_weights: torch.Tensor
    image_size: tuple[int, int]
    padded: bool


def query_attention_map(model, processor, image: Image.Image, question: str, **processor_kwargs) -> QueryAttentionMap:
    """
    Run one prefill of `model` (a `FlashSlothForConditionalGeneration`) on `image` and `question`, prompted as the
    chat template does, and return where EmbQ's query tokens looked (`QueryAttentionMap`). Attention weights exist on
    eager attention only: a model on another implementation runs on eager for this call and is switched back after.
    `processor_kwargs` go to the processor (for example `image_hd=True`).
    """
    if getattr(model.config, "use_embedded_query", True) is False:
        raise ValueError("This model has no embedded queries (use_embedded_query=False): there is no query attention.")
    image = image.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt", **processor_kwargs).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            outputs = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
    if outputs.query_attentions is None:
        raise ValueError("The prompt holds no query block: build it with the FlashSloth processor's chat template.")
    text_weights, image_weights = (weights.float().mean(dim=1)[0].cpu() for weights in outputs.query_attentions)

    base = model.model if hasattr(model, "model") else model
    layout = base.build_query_layout(
        inputs["input_ids"], inputs.get("instruction_mask"), inputs.get("image_num_crops"), len(inputs["pixel_values"])
    )
    grid = model.config.patch_grid_size
    rows = layout.image_rows[0][layout.image_mask[0]].cpu()
    patches = torch.zeros(text_weights.shape[0], int(rows.max()) + 1)
    patches[:, rows] = image_weights[:, : len(rows)]
    per_query = patches[:, : grid * grid].reshape(-1, grid, grid)  # the first crop: the whole image

    text_positions = layout.text_positions[0][layout.text_mask[0]].cpu()
    token_ids = inputs["input_ids"].flatten()[text_positions.to(inputs["input_ids"].device)].tolist()
    image_processor = processor.image_processor
    hd = processor_kwargs.get("image_hd", getattr(image_processor, "image_hd", False))
    return QueryAttentionMap(
        per_query=per_query,
        heat=per_query.mean(dim=0),
        instruction_tokens=[processor.tokenizer.decode([token]) for token in token_ids],
        instruction_weights=text_weights[:, : len(token_ids)],
        image_size=image.size,
        padded=not hd and getattr(image_processor, "image_aspect_ratio", "square") == "pad",
    )


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB: black-purple-red-yellow-white ("inferno"-like), without matplotlib."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(max=len(stops) - 2)
    fraction = (position - low)[..., None]
    return ((1 - fraction) * stops[low] + fraction * stops[low + 1]).astype(np.uint8)


def heat_overlay(image: Image.Image, attention: QueryAttentionMap, opacity: float = 0.6) -> Image.Image:
    """`image` with `attention.heat` drawn over it: the grid upsampled to the image, brighter where the queries
    looked more (scaled to the map's maximum), more opaque where it is hotter."""
    image = image.convert("RGB")
    width, height = image.size
    heat = attention.heat.numpy().astype(np.float32)
    heat = heat / heat.max() if heat.max() > 0 else heat
    side = max(width, height) if attention.padded else None
    target = (side, side) if side else (width, height)
    heat_image = Image.fromarray(heat).resize(target, resample=Image.Resampling.BILINEAR)
    if side:  # undo the padding to a square: keep the part over the image
        left, top = (side - width) // 2, (side - height) // 2
        heat_image = heat_image.crop((left, top, left + width, top + height))
    heat = np.asarray(heat_image, dtype=np.float32).clip(0, 1)
    colours = _colormap(heat).astype(np.float32)
    alpha = (opacity * (0.1 + 0.9 * heat))[..., None]
    blended = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colours
    return Image.fromarray(blended.round().astype(np.uint8))


def draw_explanation(
    image: Image.Image, attention: QueryAttentionMap, question: str, answer: str | None = None, min_side: int = 384
) -> Image.Image:
    """A picture of the image and its heat map side by side, small images enlarged to `min_side`, with the question
    (and the answer, when given) written above them."""
    image = image.convert("RGB")
    scale = max(1.0, min_side / min(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    left = image.resize(size, resample=Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    right = heat_overlay(left, attention)
    font = ImageFont.load_default()
    lines = [f"Q: {question}"] + ([f"A: {answer}"] if answer else []) + ["where the query tokens looked (right)"]
    header = 8 + 16 * len(lines)
    canvas = Image.new("RGB", (2 * size[0] + 12, size[1] + header + 4), "white")
    canvas.paste(left, (4, header))
    canvas.paste(right, (size[0] + 8, header))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((6, 4 + 16 * index), line, fill="black", font=font)
    return canvas
