"""Tiny random-weight FlashSloth models and hand-built inputs for fast tests."""

import torch
from transformers import GenerationConfig

from flashsloth import FlashSlothConfig, FlashSlothForConditionalGeneration


VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 120
QUERY_TOKEN_ID = 121
PAD_TOKEN_ID = 0
IMAGE_SIZE = 84  # 6x6 patches of 14 px -> 4 pooled tokens per crop with 3x3 windows
TOKENS_PER_CROP = 4
NUM_QUERY_TOKENS = 9

# `make_sample` turns covering one image, HD crops, two images, multi-turn (two blocks) and a text-only sample: batched,
# they reach every padding and query-block case.
MIXED_SAMPLES = [
    [(1, 1, 5, True)],
    [(1, 5, 3, True)],
    [(2, 1, 4, True)],
    [(1, 1, 6, True), (0, 1, 3, True)],
    [(0, 1, 7, False)],
]


def tiny_config(**overrides) -> FlashSlothConfig:
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 14,
    }
    text_config = {
        "model_type": "phi",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "partial_rotary_factor": 0.4,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    values = dict(
        vision_config=vision_config,
        text_config=text_config,
        query_layer_index=2,
        query_hidden_size=32,
        image_token_id=IMAGE_TOKEN_ID,
        query_token_id=QUERY_TOKEN_ID,
        query_anchor_token_id=5,
        pad_token_id=PAD_TOKEN_ID,
    )
    values.update(overrides)
    return FlashSlothConfig(**values)


def tiny_model(seed: int = 0, **config_overrides) -> FlashSlothForConditionalGeneration:
    torch.manual_seed(seed)
    model = FlashSlothForConditionalGeneration(tiny_config(**config_overrides)).eval()
    # Random init leaves biases at zero and LayerNorms at identity; perturb everything so that bugs show.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def make_sample(turns, seed: int = 0):
    """
    Hand-built expanded ids for one sample. `turns` is a list of `(num_images, crops, text_length, with_query)`:
    each turn is some prefix text, its images (placeholders + one newline token), instruction text and an optional
    query block. Returns ids, the instruction mask and the pixel values of its images.
    """
    generator = torch.Generator().manual_seed(seed)
    ids, mask, pixels, crops_per_image = [], [], [], []
    block = 0
    for num_images, crops, text_length, with_query in turns:
        ids += torch.randint(10, 100, (3,), generator=generator).tolist()  # the turn's prefix, e.g. "USER: "
        mask += [0] * 3
        for _ in range(num_images):
            ids += [IMAGE_TOKEN_ID] * (TOKENS_PER_CROP * crops) + [7]
            mask += [0] * (TOKENS_PER_CROP * crops + 1)
            pixels.append(torch.rand(crops, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1)
            crops_per_image.append(crops)
        block += 1 if with_query else 0
        ids += torch.randint(10, 100, (text_length,), generator=generator).tolist()
        mask += [block if with_query else 0] * text_length
        if with_query:
            ids += [QUERY_TOKEN_ID] * NUM_QUERY_TOKENS
            mask += [0] * NUM_QUERY_TOKENS
        ids += torch.randint(10, 100, (2,), generator=generator).tolist()  # " ASSISTANT:"
        mask += [0] * 2
    return {
        "input_ids": ids,
        "instruction_mask": mask,
        "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE),
        "image_num_crops": crops_per_image,
    }


def collate(samples, padding_side: str = "left"):
    """Pad hand-built samples into one batch the way the processor does."""
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids, attention_mask, instruction_mask = [], [], []
    for sample in samples:
        padding = [0] * (length - len(sample["input_ids"]))
        ones = [1] * len(sample["input_ids"])
        if padding_side == "left":
            input_ids.append([PAD_TOKEN_ID] * len(padding) + sample["input_ids"])
            attention_mask.append(padding + ones)
            instruction_mask.append(padding + sample["instruction_mask"])
        else:
            input_ids.append(sample["input_ids"] + [PAD_TOKEN_ID] * len(padding))
            attention_mask.append(ones + padding)
            instruction_mask.append(sample["instruction_mask"] + padding)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "instruction_mask": torch.tensor(instruction_mask),
        "pixel_values": torch.cat([sample["pixel_values"] for sample in samples]),
        "image_num_crops": torch.tensor(sum((sample["image_num_crops"] for sample in samples), []), dtype=torch.long),
    }


def tiny_model_for_processor(processor, seed: int = 0) -> FlashSlothForConditionalGeneration:
    """A tiny random model whose vocabulary and placeholder ids match a tiny processor (see processing_helpers)."""
    text_config = tiny_config().text_config.to_dict()
    text_config.update(vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    return tiny_model(
        seed,
        text_config=text_config,
        image_token_id=processor.image_token_id,
        query_token_id=processor.query_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )


def tiny_generation_config(processor, **overrides) -> GenerationConfig:
    """
    Greedy generation settings for a tiny checkpoint: stop on `<|endoftext|>` and on `</s>` (the end of an assistant
    turn), pad with the tokenizer's padding token, never generate the image or query placeholders.
    """
    tokenizer = processor.tokenizer
    values = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</s>")],
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[processor.image_token_id, processor.query_token_id],
        do_sample=False,
        max_new_tokens=6,
    )
    values.update(overrides)
    return GenerationConfig(**values)


def save_tiny_checkpoint(directory, processor, seed: int = 0) -> FlashSlothForConditionalGeneration:
    """
    Save a complete tiny checkpoint (model, generation config, processor) into `directory`, loadable with the Auto
    classes and `pipeline(..., trust_remote_code=True)`. Returns the in-memory model.
    """
    model = tiny_model_for_processor(processor, seed=seed)
    model.generation_config = tiny_generation_config(processor)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model
