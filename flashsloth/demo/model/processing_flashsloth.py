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
"""Processor for FlashSloth: expands the image and query placeholders and marks the instruction text of every query.

This file is remote code: it is copied beside the `config.json` of a checkpoint and imported by the dynamic module
loader of transformers, so it only imports the standard library, numpy, PIL, torch, transformers and its sibling
`image_processing_flashsloth.py` (with a single-dot relative import).
"""

import re
from dataclasses import dataclass
from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.models.auto.tokenization_auto import AutoTokenizer
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput

from .image_processing_flashsloth import (
    FlashSlothImageProcessor,
    FlashSlothImageProcessorKwargs,
    make_flat_image_list,
)


# `tokenizer.model_max_length` at or above this value means "no limit" (transformers uses 1e30 as a sentinel).
UNLIMITED_MODEL_MAX_LENGTH = int(1e9)
# Pad and return PyTorch tensors unless told otherwise.
DEFAULT_TEXT_KWARGS = {"padding": True, "return_tensors": "pt"}


class FlashSlothProcessorKwargs(ProcessingKwargs, total=False):
    """Call arguments of [`FlashSlothProcessor`]: the usual text kwargs plus the FlashSloth image kwargs."""

    images_kwargs: FlashSlothImageProcessorKwargs
    # transformers before 5.23 reads the defaults only from here, later releases from the processor's `text_kwargs`.
    _defaults = {"text_kwargs": DEFAULT_TEXT_KWARGS}


@dataclass
class ExpandedPrompt:
    """A prompt with its placeholders replaced by token blocks.

    Attributes:
        text: the expanded prompt.
        instruction_spans: per query block, the `(start, end)` character span of its instruction in `text`.
        replacements: per placeholder, where it was and what replaced it, in the format of
            `ProcessorMixin.get_text_with_replacements` (`type`, `span`, `new_span`, `text`, `replacement`).
    """

    text: str
    instruction_spans: list[tuple[int, int]]
    replacements: list[dict[str, Any]]


class FlashSlothProcessor(ProcessorMixin):
    r"""
    Constructs a FlashSloth processor from a [`FlashSlothImageProcessor`] and a fast tokenizer.

    Calling it on prompts (and images) returns everything the FlashSloth model reads:

    - `input_ids` / `attention_mask` `[batch, length]`, left padded by default. Every `image_token` in the text becomes
      `num_image_tokens_per_crop` image tokens per crop of its image, every `query_token` becomes `num_query_tokens`
      query tokens.
    - `pixel_values` `[total_crops, 3, 384, 384]`: the crops of all images of the batch, sample by sample, in text
      order; `image_num_crops` `[num_images]`: the crops of every image (1, or 5 in HD mode). Both are empty for a
      batch without images.
    - `instruction_mask` `[batch, length]`: `k` on the instruction text read by the `k`-th query block of the sample,
      0 elsewhere. The instruction of a query block is the text right before it that starts at the latest of: the end
      of the last image placeholder before it (plus one `"\n"` right after the placeholder, if present), the end of
      the last `user_turn_prefix` before it, the end of the previous query block.

    Args:
        image_processor ([`FlashSlothImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerFast`]):
            A fast tokenizer in which `image_token` and `query_token` are single (added) tokens.
        chat_template (`str`, *optional*):
            The Jinja chat template used by `apply_chat_template`.
        num_image_tokens_per_crop (`int`, *optional*, defaults to 81):
            Image tokens per crop (the 27x27 SigLIP grid pooled in 3x3 windows).
        num_query_tokens (`int`, *optional*, defaults to 9):
            Tokens of one query block.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            Image placeholder, in the text and as the token id that marks image positions.
        query_token (`str`, *optional*, defaults to `"<learnable>"`):
            Query placeholder that ends an instruction, in the text and as the token id of query positions.
        user_turn_prefix (`str`, *optional*, defaults to `"USER: "`):
            The text the chat template puts before every user turn; an instruction never starts before it.
    """

    valid_processor_kwargs = FlashSlothProcessorKwargs
    text_kwargs = DEFAULT_TEXT_KWARGS

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens_per_crop: int = 81,
        num_query_tokens: int = 9,
        image_token: str = "<image>",
        query_token: str = "<learnable>",
        user_turn_prefix: str = "USER: ",
        **kwargs,
    ):
        if image_token == query_token:
            raise ValueError(f"`image_token` and `query_token` must differ, both are {image_token!r}.")
        self.num_image_tokens_per_crop = num_image_tokens_per_crop
        self.num_query_tokens = num_query_tokens
        self.image_token = image_token
        self.query_token = query_token
        self.user_turn_prefix = user_turn_prefix
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"FlashSlothProcessor needs a fast tokenizer (it maps the instruction text to tokens with offset "
                f"mappings), got {type(tokenizer).__name__}."
            )
        self.image_token_id = self._single_token_id(image_token)
        self.query_token_id = self._single_token_id(query_token)
        self._placeholder_pattern = re.compile(f"{re.escape(image_token)}|{re.escape(query_token)}")

    def _single_token_id(self, token: str) -> int:
        """The id of `token`, checking that the tokenizer encodes it as exactly one token."""
        token_ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(
                f"The tokenizer encodes {token!r} as {len(token_ids)} tokens; it must be a single added token. Add "
                "the FlashSloth tokens first, e.g. with `flashsloth.processing.add_flashsloth_tokens(tokenizer)`."
            )
        return token_ids[0]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the image processor with its own class, so loading never depends on the `AutoImageProcessor` map."""
        subfolder = kwargs.pop("subfolder", "")
        image_processor = FlashSlothImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """The same on transformers >= 5.25, which loads sub-processors here: through `AutoImageProcessor`, a saved
        folder would ask for `trust_remote_code` even when this class is already imported."""
        if kwargs.get("image_processor") is None:
            image_processor_config = processor_dict.get("image_processor")
            if isinstance(image_processor_config, dict):
                kwargs["image_processor"] = FlashSlothImageProcessor.from_dict(image_processor_config)
            else:
                hub_kwargs = {key: value for key, value in kwargs.items() if key != "image_processor"}
                kwargs["image_processor"] = FlashSlothImageProcessor.from_pretrained(
                    pretrained_model_name_or_path, **hub_kwargs
                )
        return super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """[`ProcessorMixin.apply_chat_template`], with a clear error for an empty conversation (or batch)."""
        if not conversation or any(isinstance(item, (list, tuple)) and not item for item in conversation):
            raise ValueError("The conversation is empty: pass a list of messages such as [{'role': 'user', ...}].")
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_num_crops", "instruction_mask"]

    def __call__(
        self,
        images=None,
        text: TextInput | list[TextInput] | None = None,
        videos=None,
        audio=None,
        **kwargs: Unpack[FlashSlothProcessorKwargs],
    ) -> BatchFeature:
        """
        Prepare prompts and images for the model.

        Args:
            images (`ImageInput`, *optional*):
                The images, one per `image_token` in the text: a flat list (assigned to the prompts in order) or one
                list per prompt. See [`FlashSlothImageProcessor`] for the accepted types.
            text (`str` or `list[str]`, *optional*):
                The prompts, with one `image_token` where each image goes and `query_token` at the end of each
                instruction (the chat template writes both).
            videos, audio:
                Not supported; accepted for the signature `apply_chat_template` calls with.
            **kwargs:
                `padding` (default `True`), `truncation`, `max_length`, `pad_to_multiple_of`, `padding_side`,
                `add_special_tokens`, `return_attention_mask`, `return_tensors` (default `"pt"`) for the text, and
                image-processor arguments such as `image_hd` or `image_aspect_ratio`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, `pixel_values`, `image_num_crops` and
            `instruction_mask` (only `pixel_values` and `image_num_crops` when no text is given).

        Raises:
            `ValueError`: before tokenising, when the numbers of images and image placeholders differ (per prompt or
            in total), a query placeholder is in a prompt without images, or an image cannot be read, is empty, has
            the wrong number of channels or exceeds `PIL.Image.MAX_IMAGE_PIXELS`; after tokenising, when a prompt is
            empty or longer than `max_length` (without truncation) or `tokenizer.model_max_length`, or truncation
            would cut an image or query block.
        """
        if videos is not None or audio is not None:
            raise ValueError("FlashSloth reads images and text only; pass no `videos` or `audio`.")
        if text is None and images is None:
            raise ValueError("Pass `text` (prompts with image placeholders), `images`, or both.")
        output_kwargs = self._merge_kwargs(
            FlashSlothProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.get("return_tensors")
        images_kwargs = {**output_kwargs["images_kwargs"], "return_tensors": None}
        if text is None:
            return BatchFeature(data=dict(self.image_processor(images, **images_kwargs)), tensor_type=return_tensors)
        if text_kwargs.get("sanitize_control_tokens"):
            raise ValueError("FlashSlothProcessor does not support `sanitize_control_tokens=True`.")

        prompts = self._check_prompts(text)
        placeholders = [list(self._placeholder_pattern.finditer(prompt)) for prompt in prompts]
        images_per_prompt = self._assign_images(images, placeholders)
        image_inputs = self.image_processor(
            [image for prompt_images in images_per_prompt for image in prompt_images], **images_kwargs
        )

        crops = iter(image_inputs["image_num_crops"].tolist())
        expanded_prompts = [
            self._expand_placeholders(prompt, prompt_placeholders, [next(crops) for _ in prompt_images])
            for prompt, prompt_placeholders, prompt_images in zip(
                prompts, placeholders, images_per_prompt, strict=True
            )
        ]
        text_inputs = self._tokenize(expanded_prompts, text_kwargs)
        skip_tensor_conversion = list(self.skip_tensor_conversion)
        # A processor-level option since transformers 5.23, a text option before.
        if output_kwargs.get("return_text_replacement_offsets") or text_kwargs.get("return_text_replacement_offsets"):
            text_inputs["text_replacement_offsets"] = [expanded.replacements for expanded in expanded_prompts]
            # Only `apply_chat_template(..., return_assistant_tokens_mask=True)` asks for the replacement offsets, and
            # it reads the offset mapping back pair by pair in Python: kept as lists, a training batch builds in about
            # half the time it takes with a tensor.
            skip_tensor_conversion.append("offset_mapping")
        return BatchFeature(
            data={**text_inputs, **image_inputs},
            tensor_type=return_tensors,
            skip_tensor_conversion=skip_tensor_conversion,
        )

    @staticmethod
    def _check_prompts(text: Any) -> list[str]:
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")
        return list(prompts)

    def _assign_images(self, images: Any, placeholders: list[list[re.Match]]) -> list[list[Any]]:
        """Give every prompt its images, checking the counts against its image placeholders."""
        image_counts = [sum(match.group() == self.image_token for match in matches) for matches in placeholders]
        query_counts = [sum(match.group() == self.query_token for match in matches) for matches in placeholders]

        if images is None:
            if sum(image_counts):
                raise ValueError(
                    f"The text has {sum(image_counts)} {self.image_token} placeholder(s) but no images were passed. "
                    f"Pass one image per {self.image_token}, or remove the placeholders."
                )
            images_per_prompt = [[] for _ in placeholders]
        elif isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(placeholders):
                raise ValueError(
                    f"`images` is nested (one list per prompt) with {len(images)} lists, but {len(placeholders)} "
                    "prompt(s) were given."
                )
            images_per_prompt = [make_flat_image_list(prompt_images) for prompt_images in images]
            for index, (prompt_images, count) in enumerate(zip(images_per_prompt, image_counts, strict=True)):
                if len(prompt_images) != count:
                    raise ValueError(
                        f"Prompt {index} has {count} {self.image_token} placeholder(s) but {len(prompt_images)} "
                        f"image(s) were given for it. Pass exactly one image per {self.image_token}."
                    )
        else:
            flat_images = make_flat_image_list(images)
            if len(flat_images) != sum(image_counts):
                raise ValueError(
                    f"Got {len(flat_images)} image(s) but the text has {sum(image_counts)} {self.image_token} "
                    f"placeholder(s). Put one {self.image_token} in the text where each image goes (the chat template "
                    "does this for every {'type': 'image'} item)."
                )
            flat_iterator = iter(flat_images)
            images_per_prompt = [[next(flat_iterator) for _ in range(count)] for count in image_counts]

        for index, (image_count, query_count) in enumerate(zip(image_counts, query_counts, strict=True)):
            if query_count and not image_count:
                raise ValueError(
                    f"Prompt {index} has a {self.query_token} query placeholder but no image: query blocks read the "
                    f"image features of their prompt. Remove {self.query_token} from text-only prompts (the chat "
                    "template only writes it when the conversation has an image)."
                )
        return images_per_prompt

    def _expand_placeholders(
        self, prompt: str, placeholders: list[re.Match], crops_per_image: list[int]
    ) -> ExpandedPrompt:
        """Replace every placeholder with its block of tokens and find the instruction text of every query block."""
        pieces, instruction_spans, replacements = [], [], []
        crops = iter(crops_per_image)
        cursor = 0  # end of the previous placeholder in `prompt`
        shift = 0  # how much longer the expanded prompt is than `prompt` at `cursor`
        instruction_start = 0  # earliest start of the next instruction in `prompt`
        for match in placeholders:
            pieces.append(prompt[cursor : match.start()])
            if match.group() == self.image_token:
                kind = "image"
                replacement = self.image_token * (self.num_image_tokens_per_crop * next(crops))
                instruction_start = match.end() + (1 if prompt.startswith("\n", match.end()) else 0)
            else:
                kind = "query"
                replacement = self.query_token * self.num_query_tokens
                start = max(instruction_start, self._end_of_last_user_prefix(prompt, match.start()))
                instruction_spans.append((start + shift, match.start() + shift))
                instruction_start = match.end()
            new_start = match.start() + shift
            replacements.append(
                {
                    "type": kind,
                    "span": match.span(),
                    "new_span": (new_start, new_start + len(replacement)),
                    "text": match.group(),
                    "replacement": replacement,
                }
            )
            pieces.append(replacement)
            shift += len(replacement) - len(match.group())
            cursor = match.end()
        pieces.append(prompt[cursor:])
        return ExpandedPrompt("".join(pieces), instruction_spans, replacements)

    def _end_of_last_user_prefix(self, prompt: str, end: int) -> int:
        """End of the last `user_turn_prefix` that lies entirely before `end` (0 if there is none)."""
        if not self.user_turn_prefix:
            return 0
        position = prompt.rfind(self.user_turn_prefix, 0, end)
        return position + len(self.user_turn_prefix) if position >= 0 else 0

    def _tokenize(self, expanded_prompts: list[ExpandedPrompt], text_kwargs: dict) -> dict[str, list]:
        """Tokenise the expanded prompts, check their lengths and blocks, build the instruction masks and pad."""
        max_length = text_kwargs.get("max_length")
        # Unlike the tokenizer, never truncate unless asked to: a too long prompt is an error by default.
        truncation = text_kwargs.get("truncation") or False
        encoding = self.tokenizer(
            [expanded.text for expanded in expanded_prompts],
            add_special_tokens=text_kwargs.get("add_special_tokens", True),
            truncation=truncation,
            max_length=max_length,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        model_max_length = getattr(self.tokenizer, "model_max_length", None)
        if model_max_length is not None and model_max_length >= UNLIMITED_MODEL_MAX_LENGTH:
            model_max_length = None

        instruction_masks = []
        for index, (input_ids, offsets, expanded) in enumerate(
            zip(encoding["input_ids"], encoding["offset_mapping"], expanded_prompts, strict=True)
        ):
            self._check_length(index, len(input_ids), max_length, model_max_length)
            self._check_blocks(index, expanded.text, input_ids, max_length or model_max_length)
            instruction_masks.append(self._instruction_mask(input_ids, offsets, expanded.instruction_spans))

        padding = text_kwargs.get("padding", False)
        padding_side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        padded = self.tokenizer.pad(
            {"input_ids": encoding["input_ids"]},
            padding=padding,
            max_length=max_length if padding == "max_length" else None,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=padding_side,
            return_attention_mask=True,
        )
        lengths = [len(input_ids) for input_ids in padded["input_ids"]]
        if text_kwargs.get("return_tensors") is not None and len(set(lengths)) > 1:
            raise ValueError(
                f"The prompts have different lengths {sorted(set(lengths))} and cannot be stacked into tensors; pass "
                "`padding=True` (the default) or `return_tensors=None`."
            )
        text_inputs = {"input_ids": padded["input_ids"]}
        if text_kwargs.get("return_attention_mask", True) is not False:
            text_inputs["attention_mask"] = padded["attention_mask"]
        text_inputs["instruction_mask"] = [
            self._pad(mask, length, padding_side, 0) for mask, length in zip(instruction_masks, lengths, strict=True)
        ]
        if text_kwargs.get("return_offsets_mapping"):
            text_inputs["offset_mapping"] = [
                self._pad(offsets, length, padding_side, (0, 0))
                for offsets, length in zip(encoding["offset_mapping"], lengths, strict=True)
            ]
        return text_inputs

    def _check_length(self, index: int, length: int, max_length: int | None, model_max_length: int | None) -> None:
        if length == 0:
            raise ValueError(f"Prompt {index} is empty: it has no tokens. Every prompt needs some text.")
        if max_length is not None and length > max_length:
            raise ValueError(
                f"Prompt {index} has {length} tokens after expanding its placeholders, more than `max_length` = "
                f"{max_length}. Shorten the text, pass fewer images (every crop adds {self.num_image_tokens_per_crop} "
                "tokens, HD images have 5 crops), raise `max_length`, or pass `truncation=True`."
            )
        if model_max_length is not None and length > model_max_length:
            raise ValueError(
                f"Prompt {index} has {length} tokens after expanding its placeholders, more than the model accepts "
                f"(`tokenizer.model_max_length` = {model_max_length}). Shorten the text or pass fewer images (every "
                f"crop adds {self.num_image_tokens_per_crop} tokens, HD images have 5 crops)."
            )

    def _check_blocks(self, index: int, expanded_prompt: str, input_ids: list[int], limit: int | None) -> None:
        """Check that tokenisation (and truncation) kept every image and query block whole."""
        expected = (expanded_prompt.count(self.image_token), expanded_prompt.count(self.query_token))
        found = (input_ids.count(self.image_token_id), input_ids.count(self.query_token_id))
        if found != expected:
            raise ValueError(
                f"Prompt {index}: truncation to {limit} tokens would cut its image or query blocks (kept {found[0]} "
                f"of {expected[0]} image tokens and {found[1]} of {expected[1]} query tokens). Raise `max_length`, "
                "shorten the text, or disable truncation."
            )

    def _instruction_mask(
        self, input_ids: list[int], offsets: list[tuple[int, int]], instruction_spans: list[tuple[int, int]]
    ) -> list[int]:
        """Mark with `k` the tokens of the instruction of the `k`-th query block (the tokens overlapping its span)."""
        mask = [0] * len(input_ids)
        query_positions = [position for position, token in enumerate(input_ids) if token == self.query_token_id]
        search_from = 0
        for block, (span_start, _) in enumerate(instruction_spans, start=1):
            block_start = query_positions[(block - 1) * self.num_query_tokens]
            first = search_from
            while first < block_start and offsets[first][1] <= span_start:
                first += 1
            mask[first:block_start] = [block] * (block_start - first)
            search_from = block_start + self.num_query_tokens
        return mask

    @staticmethod
    def _pad(values: list, length: int, padding_side: str, pad_value: Any) -> list:
        padding = [pad_value] * (length - len(values))
        return padding + list(values) if padding_side == "left" else list(values) + padding


FlashSlothProcessor.register_for_auto_class()

__all__ = ["FlashSlothProcessor", "FlashSlothProcessorKwargs"]
