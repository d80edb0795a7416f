"""Tests of FlashSlothProcessor, the chat template and the tokenizer set-up."""

import json
import os
import subprocess
import sys

import jinja2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from processing_helpers import (
    PARITY_FIXTURES_DIR,
    PHI2_TOKENIZER_DIR,
    load_parity_reference,
    make_tiny_processor,
    make_tiny_tokenizer,
    phi2_processor,
    require_shared,
    unpadded,
)
from transformers import AutoTokenizer
from transformers.processing_utils import TextKwargs

from flashsloth.processing import (
    DEFAULT_CHAT_TEMPLATE,
    FlashSlothImageProcessor,
    FlashSlothProcessor,
    add_flashsloth_tokens,
)


SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
IMAGE_TOKENS_PER_CROP = 81
QUERY_TOKENS = 9
MODEL_INPUT_NAMES = ["input_ids", "attention_mask", "pixel_values", "image_num_crops", "instruction_mask"]


def noise_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    return Image.effect_noise((width, height), 64).convert(mode)


def one_turn(question: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def instruction_text(processor, outputs, row: int, block: int) -> str:
    ids = outputs["input_ids"][row][outputs["instruction_mask"][row] == block]
    return processor.tokenizer.decode(ids).strip()


@pytest.fixture(scope="module")
def processor():
    return make_tiny_processor()


@pytest.fixture(scope="module")
def hd_processor():
    return make_tiny_processor(image_hd=True)


# Tokenizer set-up


def test_add_flashsloth_tokens_keeps_phi2_ids():
    tokenizer = AutoTokenizer.from_pretrained(require_shared(PHI2_TOKENIZER_DIR))
    text = "USER: What is in the image?</s> ASSISTANT:"
    ids_before, length_before = tokenizer.encode("What is in the image?"), len(tokenizer)

    add_flashsloth_tokens(tokenizer)

    assert tokenizer.convert_tokens_to_ids(["<learnable>", "</s>", "<image>"]) == [50295, 50296, 50297]
    assert len(tokenizer) == length_before + 3
    assert tokenizer.encode("What is in the image?") == ids_before
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == 50256 and tokenizer.padding_side == "left"
    assert 50296 in tokenizer.encode(text)
    add_flashsloth_tokens(tokenizer)
    assert len(tokenizer) == length_before + 3


def test_tiny_tokenizer_is_small_and_deterministic():
    tokenizer = make_tiny_tokenizer()

    assert len(tokenizer) <= 512
    assert tokenizer.convert_tokens_to_ids(["<learnable>", "</s>", "<image>"]) == [
        len(tokenizer) - 3 + i for i in range(3)
    ]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0 and tokenizer.padding_side == "left"
    assert make_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


# The released one-turn prompt, with the real Phi-2 tokenizer


@pytest.mark.parametrize(("variant", "image_hd"), [("base", False), ("hd", True)])
def test_one_turn_prompt_matches_parity_reference(variant, image_hd):
    reference = load_parity_reference(variant)
    processor = phi2_processor(image_hd=image_hd)
    crops = 5 if image_hd else 1

    prompt = processor.apply_chat_template(one_turn(reference["question"]), add_generation_prompt=True)
    outputs = processor(images=Image.open(PARITY_FIXTURES_DIR / variant / "image.png"), text=prompt)

    assert prompt == reference["prompt"]
    expected_ids = []
    for token_id in reference["input_ids"]:
        if token_id == -200:
            expected_ids += [processor.image_token_id] * (IMAGE_TOKENS_PER_CROP * crops)
        elif token_id == 50295:
            expected_ids += [processor.query_token_id] * QUERY_TOKENS
        else:
            expected_ids.append(token_id)
    assert processor.image_token_id == 50297 and processor.query_token_id == 50295
    assert outputs["input_ids"][0].tolist() == expected_ids
    assert len(expected_ids) == reference["expanded_length"]
    positions = reference["positions"]
    expected_mask = torch.zeros(reference["expanded_length"], dtype=torch.long)
    expected_mask[positions["question_span_start"] : positions["question_span_end"]] = 1
    assert (positions["question_span_start"], positions["question_span_end"]) == (
        (114, 126) if variant == "base" else (438, 450)
    )
    assert torch.equal(outputs["instruction_mask"][0], expected_mask)
    assert outputs["attention_mask"].all()
    assert outputs["pixel_values"].shape == (crops, 3, 384, 384)
    assert outputs["image_num_crops"].tolist() == [crops]


def test_apply_chat_template_with_images_equals_calling_the_processor():
    processor = phi2_processor()
    image = noise_image(50, 40)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]

    from_template = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    direct = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True))

    assert set(from_template.keys()) == set(MODEL_INPUT_NAMES)
    for key in MODEL_INPUT_NAMES:
        assert torch.equal(from_template[key], direct[key]), key


# Chat template


def test_multi_turn_rendering(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "How many?"}]},
    ]

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)

    assert prompt == (
        f"{SYSTEM} USER: <image>\nWhat is it?<learnable> ASSISTANT: A cat.</s>USER: How many?<learnable> ASSISTANT:"
    )
    assert processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt


@pytest.mark.parametrize(
    ("messages", "add_generation_prompt", "expected"),
    [
        (one_turn("Hello?", with_image=False), True, f"{SYSTEM} USER: Hello? ASSISTANT:"),
        ([{"role": "user", "content": "Hello?"}], False, f"{SYSTEM} USER: Hello? "),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            ],
            False,
            "Be brief. USER: Hi ASSISTANT: Hello.</s>",
        ),
        (
            [
                {"role": "user", "content": "First"},
                {"role": "assistant", "content": "Yes."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image", "url": "a.png"},
                        {"type": "text", "text": "them."},
                        {"type": "image", "path": "b.png"},
                    ],
                },
            ],
            True,
            f"{SYSTEM} USER: First<learnable> ASSISTANT: Yes.</s>USER: <image>\n<image>\nCompare them.<learnable> "
            "ASSISTANT:",
        ),
    ],
)
def test_chat_template_variants(processor, messages, add_generation_prompt, expected):
    assert processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_rejects_unknown_roles(processor):
    with pytest.raises(jinja2.TemplateError, match="role"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_marks_assistant_tokens_after_expanded_placeholders(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": noise_image(20, 20)}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello there."},
    ]

    outputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )

    answer = outputs["input_ids"][0][torch.as_tensor(outputs["assistant_masks"][0]) == 1]
    assert processor.tokenizer.decode(answer).strip() == "Hello there.</s>"
    assert set(outputs.keys()) == {*MODEL_INPUT_NAMES, "assistant_masks"}



def test_offset_mapping_stays_a_tensor_when_asked_for_directly(processor):
    # Only the assistant-mask path of `apply_chat_template` gets the offsets as lists (transformers reads them pair by
    # pair); a direct call keeps the requested tensor type.
    prompt = "USER: <image>\nHi<learnable> ASSISTANT:"
    outputs = processor(images=[noise_image(20, 20)], text=prompt, return_offsets_mapping=True, return_tensors="pt")

    assert isinstance(outputs["offset_mapping"], torch.Tensor)
    assert outputs["offset_mapping"].shape == (*outputs["input_ids"].shape, 2)


def test_batched_assistant_masks_equal_single_ones(processor):
    conversations = [
        [
            {"role": "user", "content": [{"type": "image", "image": noise_image(20, 20)}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": a},
        ]
        for q, a in [("Hi", "Hello there."), ("What is shown in this picture?", "Noise.")]
    ]
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)

    batch = processor.apply_chat_template(conversations, processor_kwargs={"padding_side": "right"}, **kwargs)

    for row, conversation in enumerate(conversations):
        single = processor.apply_chat_template(conversation, **kwargs)
        length = single["input_ids"].shape[1]
        assert batch["input_ids"][row, :length].tolist() == single["input_ids"][0].tolist()
        assert list(batch["assistant_masks"][row][:length]) == list(single["assistant_masks"][0])
        assert not any(batch["assistant_masks"][row][length:])


# Placeholder expansion and the instruction mask


def test_multi_turn_instruction_mask_numbers_the_query_blocks(processor):
    prompt = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "How many cats are there?"},
        ],
        add_generation_prompt=True,
    )

    outputs = processor(images=noise_image(30, 20), text=prompt)

    assert outputs["instruction_mask"].max() == 2
    assert instruction_text(processor, outputs, 0, 1) == "What is it?"
    assert instruction_text(processor, outputs, 0, 2) == "How many cats are there?"
    special = (outputs["input_ids"] == processor.image_token_id) | (outputs["input_ids"] == processor.query_token_id)
    assert not outputs["instruction_mask"][special].any()


@pytest.mark.parametrize(
    ("prompt", "instructions"),
    [
        ("<image>\nDescribe.<learnable>", ["Describe."]),
        ("Look: <image> and <image>\n\nCompare them.<learnable> ok", ["Compare them."]),
        ("<image>USER: Why?<learnable><learnable> Then: what<learnable>", ["Why?", "", "Then: what"]),
        ("USER: <image>\n<learnable>", [""]),
    ],
)
def test_instruction_spans(processor, prompt, instructions):
    images = [noise_image(20, 20)] * prompt.count("<image>")

    outputs = processor(images=images, text=prompt)

    for block, expected in enumerate(instructions, start=1):
        assert instruction_text(processor, outputs, 0, block) == expected
    assert outputs["instruction_mask"].max() <= len(instructions)


@pytest.mark.parametrize("image_hd", [False, True])
def test_multi_image_prompt_keeps_image_order(image_hd):
    processor = make_tiny_processor(image_hd=image_hd)
    images = [noise_image(60, 20), noise_image(20, 70, "L")]
    crops = 5 if image_hd else 1

    outputs = processor(images=images, text="USER: <image>\n<image>\nCompare them.<learnable> ASSISTANT:")

    expected_pixels = torch.cat(
        [processor.image_processor(image, return_tensors="pt")["pixel_values"] for image in images]
    )
    assert torch.equal(outputs["pixel_values"], expected_pixels)
    assert outputs["image_num_crops"].tolist() == [crops, crops]
    assert (outputs["input_ids"] == processor.image_token_id).sum() == 2 * crops * IMAGE_TOKENS_PER_CROP
    assert instruction_text(processor, outputs, 0, 1) == "Compare them."


def test_batch_with_zero_one_and_two_images_equals_single_processing(hd_processor):
    image_a, image_b, image_c = noise_image(64, 48), noise_image(30, 90, "RGBA"), noise_image(128, 128, "P")
    samples = [
        ("USER: Just text here. ASSISTANT:", []),
        ("USER: <image>\nWhat is it?<learnable> ASSISTANT:", [image_a]),
        (
            "USER: <image>\n<image>\nSame?<learnable> ASSISTANT: No.</s>USER: Sure?<learnable> ASSISTANT:",
            [image_b, image_c],
        ),
    ]
    prompts = [prompt for prompt, _ in samples]

    flat = hd_processor(images=[image for _, images in samples for image in images], text=prompts)
    nested = hd_processor(images=[images for _, images in samples], text=prompts)

    singles = [hd_processor(images=images or None, text=prompt) for prompt, images in samples]
    for key in MODEL_INPUT_NAMES:
        assert torch.equal(flat[key], nested[key]), key
    assert torch.equal(flat["pixel_values"], torch.cat([single["pixel_values"] for single in singles]))
    assert flat["image_num_crops"].tolist() == [5, 5, 5]
    lengths = [single["input_ids"].shape[1] for single in singles]
    assert flat["input_ids"].shape == (3, max(lengths))
    for row, (single, length) in enumerate(zip(singles, lengths, strict=True)):
        attention_mask = flat["attention_mask"][row]
        assert attention_mask.tolist() == [0] * (max(lengths) - length) + [1] * length  # left padding
        for key in ("input_ids", "instruction_mask"):
            assert unpadded(flat[key][row], attention_mask) == single[key][0].tolist(), key
        assert (flat["input_ids"][row][attention_mask == 0] == hd_processor.tokenizer.pad_token_id).all()
        assert not flat["instruction_mask"][row][attention_mask == 0].any()
    assert flat["instruction_mask"].amax(dim=1).tolist() == [0, 1, 2]


def test_text_only_batch_has_empty_image_outputs(processor):
    outputs = processor(text=["Hello there.", "USER: A longer text prompt. ASSISTANT:"])

    assert set(outputs.keys()) == set(MODEL_INPUT_NAMES)
    assert outputs["pixel_values"].shape == (0, 3, 384, 384) and outputs["pixel_values"].dtype == torch.float32
    assert outputs["image_num_crops"].shape == (0,) and outputs["image_num_crops"].dtype == torch.int64
    assert not outputs["instruction_mask"].any()
    assert outputs["input_ids"].dtype == outputs["attention_mask"].dtype == torch.int64


def test_batched_chat_template_with_and_without_images(processor):
    image = noise_image(30, 40)
    conversations = [one_turn("What is it?", with_image=False), one_turn("And this?")]
    conversations[1][0]["content"][0]["image"] = image

    from_template = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    direct = processor(
        images=[[], [image]], text=processor.apply_chat_template(conversations, add_generation_prompt=True)
    )

    for key in MODEL_INPUT_NAMES:
        assert torch.equal(from_template[key], direct[key]), key
    assert from_template["instruction_mask"].amax(dim=1).tolist() == [0, 1]


def test_image_arguments_at_call_time(processor):
    image = noise_image(30, 20)
    prompt = "USER: <image>\nHi<learnable> ASSISTANT:"

    hd = processor(images=image, text=prompt, image_hd=True)
    padded = processor(images=image, text=prompt, images_kwargs={"image_aspect_ratio": "pad"})

    assert hd["image_num_crops"].tolist() == [5]
    assert (hd["input_ids"] == processor.image_token_id).sum() == 5 * IMAGE_TOKENS_PER_CROP
    expected = FlashSlothImageProcessor(image_aspect_ratio="pad")(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(padded["pixel_values"], expected)


def test_images_without_text_give_pixel_values_only(hd_processor):
    outputs = hd_processor(images=[noise_image(30, 40), noise_image(40, 30)])

    assert set(outputs.keys()) == {"pixel_values", "image_num_crops"}
    assert outputs["pixel_values"].shape == (10, 3, 384, 384)
    assert outputs["image_num_crops"].tolist() == [5, 5]


def test_padding_options(processor):
    prompts = ["USER: <image>\nWhat?<learnable> ASSISTANT:", "Hi"]
    images = [noise_image(20, 20)]

    right = processor(images=images, text=prompts, padding_side="right")
    fixed = processor(images=images, text=prompts, padding="max_length", max_length=128)
    multiple = processor(images=images, text=prompts, pad_to_multiple_of=64)
    lists = processor(images=images, text=prompts, padding=False, return_tensors=None)

    assert right["attention_mask"][1].tolist()[:2] == [1, 1] and right["attention_mask"][1, -1] == 0
    assert unpadded(right["instruction_mask"][0], right["attention_mask"][0]) == unpadded(
        fixed["instruction_mask"][0], fixed["attention_mask"][0]
    )
    assert fixed["input_ids"].shape == (2, 128)
    assert multiple["input_ids"].shape[1] % 64 == 0
    assert [len(ids) for ids in lists["input_ids"]] == [len(mask) for mask in lists["instruction_mask"]]
    assert isinstance(lists["input_ids"], list) and isinstance(lists["pixel_values"], np.ndarray)
    assert processor(images=images, text=prompts, return_tensors="np")["input_ids"].dtype == np.int64
    assert "attention_mask" not in processor(text="Hi", return_attention_mask=False)


def test_truncation_keeps_blocks_whole(processor):
    prompt = processor.apply_chat_template(one_turn("What is it?"), add_generation_prompt=True)
    full = processor(images=noise_image(20, 20), text=prompt)
    length = full["input_ids"].shape[1]
    tokenizer = processor.tokenizer

    tokenizer.truncation_side = "left"
    try:
        truncated = processor(images=noise_image(20, 20), text=prompt, truncation=True, max_length=length - 10)
    finally:
        tokenizer.truncation_side = "right"

    assert torch.equal(truncated["input_ids"], full["input_ids"][:, 10:])
    assert torch.equal(truncated["instruction_mask"], full["instruction_mask"][:, 10:])
    with pytest.raises(ValueError, match="would cut its image or query blocks"):
        processor(images=noise_image(20, 20), text=prompt, truncation=True, max_length=length - 6)
    with pytest.raises(ValueError, match="more than `max_length`"):
        processor(images=noise_image(20, 20), text=prompt, max_length=length - 1)


def test_prompt_longer_than_model_max_length_raises():
    processor = make_tiny_processor(image_hd=True)
    processor.tokenizer.model_max_length = 800
    images = [noise_image(20, 20), noise_image(20, 20)]

    with pytest.raises(ValueError, match="model_max_length"):
        processor(images=images, text="<image><image>Two HD images are 810 tokens.<learnable>")


# Errors, raised before any tokenisation


@pytest.fixture
def forbid_tokenisation(processor, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer ran before the input error was raised")

    monkeypatch.setattr(type(processor.tokenizer), "__call__", fail)


@pytest.mark.parametrize(
    ("text", "images", "message"),
    [
        ("<image> one image", None, "no images were passed"),
        ("<image> one image", [Image.new("RGB", (5, 5))] * 2, "Got 2 image"),
        ("<image><image> two images", [Image.new("RGB", (5, 5))], "Got 1 image"),
        ("no image placeholder", [Image.new("RGB", (5, 5))], "0 <image> placeholder"),
        (["<image> a", "b"], [[Image.new("RGB", (5, 5))], [Image.new("RGB", (5, 5))]], "Prompt 1 has 0"),
        (["<image> a", "b"], [[Image.new("RGB", (5, 5))]], "nested"),
        ("text only<learnable>", None, "query placeholder but no image"),
        (["<image> a<learnable>", "b<learnable>"], [Image.new("RGB", (5, 5))], "Prompt 1 has a <learnable>"),
        ("<image>", [Image.new("RGB", (0, 5))], "empty image"),
        ("<image>", ["/no/such/image.png"], "Could not read"),
        ("<image>", [np.zeros((8, 8, 2), dtype=np.uint8)], "channel"),
        ("<image>", [object()], "Unsupported image type"),
        (42, None, "`text` must be"),
        ([], None, "`text` must be"),
        (None, None, "Pass `text`"),
    ],
)
def test_invalid_inputs_raise_value_error_before_tokenisation(processor, forbid_tokenisation, text, images, message):
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


def test_decompression_bomb_raises_value_error(processor, forbid_tokenisation, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        processor(images=Image.new("RGB", (20, 20)), text="<image>")


def test_unsupported_arguments_raise_value_error(processor):
    with pytest.raises(ValueError, match="videos"):
        processor(text="Hi", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])
    if "sanitize_control_tokens" in TextKwargs.__annotations__:  # older transformers ignore it with a warning
        with pytest.raises(ValueError, match="sanitize_control_tokens"):
            processor(text="Hi", sanitize_control_tokens=True)


def test_tokenizer_without_flashsloth_tokens_is_rejected():
    tokenizer = AutoTokenizer.from_pretrained(require_shared(PHI2_TOKENIZER_DIR))

    with pytest.raises(ValueError, match="add_flashsloth_tokens"):
        FlashSlothProcessor(image_processor=FlashSlothImageProcessor(), tokenizer=tokenizer)


# Decoding and model inputs


def test_decoding_skips_placeholders(processor):
    outputs = processor(images=noise_image(20, 20), text="USER: <image>\nWhat?<learnable> ASSISTANT: Red.</s>")

    assert processor.post_process_image_text_to_text(outputs["input_ids"]) == ["USER: \nWhat? ASSISTANT: Red."]
    assert processor.batch_decode(outputs["input_ids"], skip_special_tokens=True) == ["USER: \nWhat? ASSISTANT: Red."]
    assert processor.decode(outputs["input_ids"][0]).count("<image>") == IMAGE_TOKENS_PER_CROP
    assert processor.model_input_names == MODEL_INPUT_NAMES


# Saving and loading


FRESH_PROCESS_SCRIPT = """
import json
import sys

sys.modules["flashsloth"] = None  # the saved folder must work without the flashsloth package

import numpy as np
from PIL import Image
from transformers import AutoProcessor

folder, image_path, prompts, output_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
for component in (processor, processor.image_processor):
    assert type(component).__module__.startswith("transformers_modules."), type(component).__module__
outputs = processor(images=[Image.open(image_path)], text=prompts, return_tensors="np")
np.savez(output_path, **outputs)
"""


def test_save_and_reload_in_process(tmp_path):
    processor = make_tiny_processor(image_hd=True, image_aspect_ratio="pad")
    processor.save_pretrained(tmp_path)

    files = set(os.listdir(tmp_path))
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"} <= files
    assert {"processing_flashsloth.py", "image_processing_flashsloth.py"} <= files
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_flashsloth.FlashSlothProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_flashsloth.FlashSlothImageProcessor"
    )
    assert (config["num_image_tokens_per_crop"], config["num_query_tokens"]) == (81, 9)
    assert (tmp_path / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE

    reloaded = FlashSlothProcessor.from_pretrained(tmp_path)

    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert reloaded.tokenizer.padding_side == "left" and reloaded.chat_template == DEFAULT_CHAT_TEMPLATE
    prompts = ["USER: <image>\nWhat?<learnable> ASSISTANT:", "Hi"]
    image = noise_image(40, 30)
    expected, actual = processor(images=image, text=prompts), reloaded(images=image, text=prompts)
    for key in MODEL_INPUT_NAMES:
        assert torch.equal(expected[key], actual[key]), key


def test_auto_processor_loads_saved_folder_in_a_fresh_process(tmp_path):
    processor = make_tiny_processor(image_hd=True)
    processor.tokenizer.model_max_length = 1000
    processor.save_pretrained(tmp_path / "checkpoint")
    noise_image(50, 30).save(tmp_path / "image.png")
    prompts = [processor.apply_chat_template(one_turn("What is it?"), add_generation_prompt=True), "Text only."]
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}

    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            FRESH_PROCESS_SCRIPT,
            str(tmp_path / "checkpoint"),
            str(tmp_path / "image.png"),
            json.dumps(prompts),
            str(tmp_path / "outputs.npz"),
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    expected = processor(images=[Image.open(tmp_path / "image.png")], text=prompts, return_tensors="np")
    with np.load(tmp_path / "outputs.npz") as actual:
        assert sorted(actual.files) == sorted(MODEL_INPUT_NAMES)
        for key in MODEL_INPUT_NAMES:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


# Property test

PIL_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I", "F", "I;16"]
PROMPT_PIECES = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(
        ["<image>", "<image>\n", "<learnable>", "USER: ", " ASSISTANT:", "</s>", "\n", "<ima", "learnable>"]
    ),
)


@st.composite
def processor_inputs(draw):
    prompts = draw(st.lists(st.lists(PROMPT_PIECES, max_size=6).map("".join), min_size=1, max_size=3))
    num_placeholders = sum(prompt.count("<image>") for prompt in prompts)
    num_images = max(0, min(4, num_placeholders + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))))
    images = [
        noise_image(draw(st.integers(1, 600)), draw(st.integers(1, 600)), draw(st.sampled_from(PIL_MODES)))
        for _ in range(num_images)
    ]
    if num_images == num_placeholders and draw(st.booleans()):
        per_prompt = iter(images)
        images = [[next(per_prompt) for _ in range(prompt.count("<image>"))] for prompt in prompts]
    return prompts, images, draw(st.booleans())


@pytest.fixture(scope="module")
def property_processors():
    return {image_hd: make_tiny_processor(image_hd=image_hd) for image_hd in (False, True)}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inputs=processor_inputs())
def test_random_inputs_give_consistent_outputs_or_documented_errors(property_processors, inputs):
    prompts, images, image_hd = inputs
    processor = property_processors[image_hd]
    image_counts = [prompt.count("<image>") for prompt in prompts]
    query_counts = [prompt.count("<learnable>") for prompt in prompts]
    num_images = sum(1 for image in images for _ in (image if isinstance(image, list) else [image]))
    must_fail = (
        num_images != sum(image_counts)
        or any(q and not i for q, i in zip(query_counts, image_counts, strict=True))
        or "" in prompts
    )

    try:
        outputs = processor(images=images or None, text=prompts)
    except ValueError as error:
        assert must_fail or "tokens after expanding" in str(error), str(error)
        return
    assert not must_fail

    crops = 5 if image_hd else 1
    batch, length = outputs["input_ids"].shape
    assert batch == len(prompts)
    for key in ("attention_mask", "instruction_mask"):
        assert outputs[key].shape == (batch, length)
    assert outputs["pixel_values"].shape == (num_images * crops, 3, 384, 384)
    assert outputs["image_num_crops"].tolist() == [crops] * num_images
    ids, attention_mask, instruction_mask = (
        outputs["input_ids"],
        outputs["attention_mask"],
        outputs["instruction_mask"],
    )
    for row in range(batch):
        assert (ids[row] == processor.image_token_id).sum() == image_counts[row] * crops * IMAGE_TOKENS_PER_CROP
        assert (ids[row] == processor.query_token_id).sum() == query_counts[row] * QUERY_TOKENS
        assert instruction_mask[row].max() <= query_counts[row]
        valid = attention_mask[row].tolist()
        assert valid[-1] == 1 and valid == sorted(valid)  # left padding
    special = (ids == processor.image_token_id) | (ids == processor.query_token_id) | (attention_mask == 0)
    assert not instruction_mask[special].any()
