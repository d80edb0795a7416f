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
"""Build a FlashSloth processor from a tokenizer (package code, not shipped with checkpoints)."""

import os
from importlib import resources

from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase

from .image_processing_flashsloth import FlashSlothImageProcessor
from .processing_flashsloth import FlashSlothProcessor


IMAGE_TOKEN = "<image>"
QUERY_TOKEN = "<learnable>"
END_OF_TURN_TOKEN = "</s>"
# The order in which the tokens are added: with the Phi-2 tokenizer this gives <learnable> 50295 (the id of the
# released tokenizer), </s> 50296 and <image> 50297 (the released config's `image_token_index`).
FLASHSLOTH_TOKENS = (QUERY_TOKEN, END_OF_TURN_TOKEN, IMAGE_TOKEN)

DEFAULT_CHAT_TEMPLATE = resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def add_flashsloth_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """
    Prepare a tokenizer for FlashSloth, in place.

    Adds `<learnable>`, `</s>` and `<image>` (in that order, those not yet present) as special added tokens after the
    existing vocabulary, so no existing id changes. The end-of-sequence token stays the tokenizer's own (Phi-2:
    `<|endoftext|>`); `</s>`, which ends assistant turns in the chat template, is only an added token, so generation
    should stop on both (list both ids as `eos_token_id` in the generation config). Sets the end-of-sequence token as
    padding token when there is none, and left padding for batched generation.

    Returns:
        The same tokenizer.
    """
    vocabulary = tokenizer.get_vocab()
    new_tokens = [
        AddedToken(token, normalized=False, special=True) for token in FLASHSLOTH_TOKENS if token not in vocabulary
    ]
    tokenizer.add_tokens(new_tokens, special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a padding nor an end-of-sequence token; set `pad_token` first."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # `save_pretrained` writes the init kwargs (with current values): record the padding side there to keep it.
    tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
    image_hd: bool = False,
    image_aspect_ratio: str = "square",
    image_size: int = 384,
    num_image_tokens_per_crop: int = 81,
    num_query_tokens: int = 9,
    chat_template: str | None = None,
) -> FlashSlothProcessor:
    """
    Build a [`FlashSlothProcessor`] with the FlashSloth tokens and the default chat template.

    Args:
        tokenizer (`PreTrainedTokenizerBase`, `str` or `os.PathLike`):
            A fast tokenizer (modified in place: [`add_flashsloth_tokens`], and the chat template is set on it too)
            or a path / Hub id to load one from.
        image_hd (`bool`, *optional*, defaults to `False`):
            Five crops per image (FlashSloth-HD) instead of one.
        image_aspect_ratio (`str`, *optional*, defaults to `"square"`):
            `"square"` (squash, the released checkpoints) or `"pad"` (pad to a square first).
        image_size (`int`, *optional*, defaults to 384):
            Side of every crop.
        num_image_tokens_per_crop (`int`, *optional*, defaults to 81):
            Image tokens per crop.
        num_query_tokens (`int`, *optional*, defaults to 9):
            Tokens of one query block.
        chat_template (`str`, *optional*):
            A Jinja chat template; defaults to the FlashSloth template (`chat_template.jinja`).
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    add_flashsloth_tokens(tokenizer)
    chat_template = DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template
    tokenizer.chat_template = chat_template
    image_processor = FlashSlothImageProcessor(
        size={"height": image_size, "width": image_size},
        image_hd=image_hd,
        image_aspect_ratio=image_aspect_ratio,
    )
    return FlashSlothProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template,
        num_image_tokens_per_crop=num_image_tokens_per_crop,
        num_query_tokens=num_query_tokens,
        image_token=IMAGE_TOKEN,
        query_token=QUERY_TOKEN,
    )
