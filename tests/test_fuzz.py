"""Fuzzing of the processor and the chat template with hypothesis, bounded for CI (300 examples each, about 6 s on
2 cores).

Random prompts (any unicode, placeholder look-alikes), random images (sizes, PIL modes, arrays, tensors) and random
conversations either give outputs that satisfy the invariants below or raise the documented error: `ValueError` from
the processor (and for an empty conversation), `jinja2.TemplateError` from the chat template. CI runs a fixed set of
examples (derandomized); set FLASHSLOTH_FUZZ_EXAMPLES=5000 for a longer, random run (about 2 minutes).
"""

import os

import jinja2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from processing_helpers import make_tiny_processor


TOKENS_PER_CROP = 4
QUERY_TOKENS = 9
LONG_RUN = "FLASHSLOTH_FUZZ_EXAMPLES" in os.environ


def fuzz_settings(examples: int):
    return settings(
        max_examples=int(os.environ.get("FLASHSLOTH_FUZZ_EXAMPLES", examples)),
        deadline=None,
        derandomize=not LONG_RUN,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(scope="module")
def processors():
    return {
        image_hd: make_tiny_processor(image_size=42, num_image_tokens_per_crop=TOKENS_PER_CROP, image_hd=image_hd)
        for image_hd in (False, True)
    }


# Text: arbitrary unicode (no lone surrogates, which are not valid text) mixed with the template's markup and near
# misses of the placeholders.
MARKUP = ["<image>", "<image>\n", "<learnable>", "USER: ", " ASSISTANT:", "</s>", "<|endoftext|>", "\n", "<ima",
          "ge>", "<image >", "<<image>>", "<IMAGE>", "learnable>", "<learnable", "\u200b<image>", "<im\u0000age>"]
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10)
PROMPT = st.lists(st.one_of(TEXT, st.sampled_from(MARKUP)), max_size=6).map("".join)
PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I", "F", "I;16", "YCbCr"]


@st.composite
def images(draw):
    """One image of a random kind: a PIL image of any mode, a uint8/float numpy array, or a uint8 torch tensor."""
    width, height = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    kind = draw(st.sampled_from(["pil", "array", "float", "grey", "tensor"]))
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        if mode == "I;16":
            return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        return Image.fromarray(rgb).convert(mode)
    if kind == "array":
        return rgb
    if kind == "float":
        return rgb.astype(np.float32) / 255
    if kind == "grey":
        return rgb[..., 0]
    return torch.from_numpy(rgb).permute(2, 0, 1)


@st.composite
def processor_calls(draw):
    prompts = draw(st.lists(PROMPT, min_size=1, max_size=3))
    num_placeholders = sum(prompt.count("<image>") for prompt in prompts)
    num_images = max(0, min(5, num_placeholders + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))))
    drawn = [draw(images()) for _ in range(num_images)]
    nested = num_images == num_placeholders and draw(st.booleans())
    if nested:
        per_prompt = iter(drawn)
        drawn = [[next(per_prompt) for _ in range(prompt.count("<image>"))] for prompt in prompts]
    return prompts, drawn, draw(st.booleans())


def expanded(prompt: str, crops: int) -> str:
    """The prompt as the processor must expand it (placeholders never overlap, so the order does not matter)."""
    return prompt.replace("<image>", "<image>" * (TOKENS_PER_CROP * crops)).replace(
        "<learnable>", "<learnable>" * QUERY_TOKENS
    )


def check_instruction_mask(row_ids: list[int], row_mask: list[int], query_token_id: int, num_blocks: int):
    """Tokens marked `k` form one run that ends right before the `k`-th query block (or there are none)."""
    query_positions = [position for position, token in enumerate(row_ids) if token == query_token_id]
    block_starts = query_positions[::QUERY_TOKENS]
    assert len(block_starts) == num_blocks
    assert set(row_mask) <= set(range(num_blocks + 1))
    for block, start in enumerate(block_starts, start=1):
        marked = [position for position, value in enumerate(row_mask) if value == block]
        if marked:
            assert marked == list(range(marked[0], start)), (block, marked, start)


@fuzz_settings(examples=300)
@given(call=processor_calls())
def test_processor_outputs_satisfy_the_invariants_or_raise_value_error(processors, call):
    prompts, drawn, image_hd = call
    processor = processors[image_hd]
    image_counts = [prompt.count("<image>") for prompt in prompts]
    query_counts = [prompt.count("<learnable>") for prompt in prompts]
    num_images = sum(len(item) if isinstance(item, list) else 1 for item in drawn)
    invalid = (
        num_images != sum(image_counts)
        or any(queries and not images for queries, images in zip(query_counts, image_counts, strict=True))
        or "" in prompts
    )
    try:
        outputs = processor(images=drawn or None, text=prompts)
    except ValueError as error:
        assert invalid, f"unexpected ValueError: {error}"
        return
    assert not invalid, "invalid input accepted"

    crops = 5 if image_hd else 1
    ids, attention_mask, instruction_mask = outputs["input_ids"], outputs["attention_mask"], outputs["instruction_mask"]
    assert outputs["image_num_crops"].tolist() == [crops] * num_images
    pixel_values = outputs["pixel_values"]
    assert pixel_values.shape == (num_images * crops, 3, 42, 42) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all() and (pixel_values.abs() <= 1).all()
    for row, prompt in enumerate(prompts):
        real = attention_mask[row].bool()
        row_ids = ids[row][real].tolist()
        # Placeholders expand to whole blocks and nothing else turns into them: the ids decode to the expanded text.
        assert processor.tokenizer.decode(row_ids, clean_up_tokenization_spaces=False) == expanded(prompt, crops)
        assert row_ids.count(processor.image_token_id) == image_counts[row] * crops * TOKENS_PER_CROP
        row_mask = instruction_mask[row][real].tolist()
        check_instruction_mask(row_ids, row_mask, processor.query_token_id, query_counts[row])
        assert not instruction_mask[row][~real].any()


# The chat template

ROLES = ["system", "user", "assistant", "tool", "User"]


@st.composite
def content_items(draw):
    kind = draw(st.sampled_from(["text", "text", "image", "video"]))
    return {"type": kind, "text": draw(PROMPT)} if kind == "text" else {"type": kind}


@st.composite
def messages(draw):
    role = draw(st.sampled_from(ROLES))
    content = draw(st.one_of(PROMPT, st.lists(content_items(), max_size=3)))
    return {"role": role, "content": content}


def texts(message: dict) -> list[str]:
    content = message["content"]
    return [content] if isinstance(content, str) else [item["text"] for item in content if item["type"] == "text"]


def items(message: dict, kind: str) -> int:
    content = message["content"]
    return 0 if isinstance(content, str) else sum(item["type"] == kind for item in content)


def conversation_is_valid(conversation: list[dict]) -> bool:
    for index, message in enumerate(conversation):
        allowed_roles = ("system", "user", "assistant") if index == 0 else ("user", "assistant")
        if message["role"] not in allowed_roles or items(message, "video"):
            return False
        if items(message, "image") and message["role"] != "user":
            return False
        if any("<image>" in text or "<learnable>" in text for text in texts(message)):
            return False
    return True


@fuzz_settings(examples=300)
@given(conversation=st.lists(messages(), max_size=5), add_generation_prompt=st.booleans())
def test_chat_template_renders_valid_conversations_and_rejects_the_rest(
    processors, conversation, add_generation_prompt
):
    processor = processors[False]
    if not conversation:
        with pytest.raises(ValueError, match="conversation is empty"):
            processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        return
    try:
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError:
        assert not conversation_is_valid(conversation), "a valid conversation was rejected"
        return
    assert conversation_is_valid(conversation), "an invalid conversation was rendered"

    turns = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    user_turns = [message for message in turns if message["role"] == "user"]
    num_images = sum(items(message, "image") for message in user_turns)
    assert prompt.count("<image>") == num_images
    assert prompt.count("<learnable>") == (len(user_turns) if num_images else 0)
    if add_generation_prompt:
        assert prompt.endswith("ASSISTANT:")

    # The rendered conversation with one image per image item is a valid processor input.
    pictures = [np.full((8, 8, 3), index, dtype=np.uint8) for index in range(num_images)]
    outputs = processor(images=pictures or None, text=prompt)
    assert (outputs["input_ids"] == processor.image_token_id).sum() == num_images * TOKENS_PER_CROP
    assert outputs["instruction_mask"].max() <= len(user_turns)
