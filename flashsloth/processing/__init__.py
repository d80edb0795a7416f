"""FlashSloth preprocessing: image processor, processor, chat template and tokenizer set-up."""

from .image_processing_flashsloth import FlashSlothImageProcessor, FlashSlothImageProcessorKwargs
from .processing_flashsloth import FlashSlothProcessor, FlashSlothProcessorKwargs
from .tokenizer_setup import (
    DEFAULT_CHAT_TEMPLATE,
    FLASHSLOTH_TOKENS,
    IMAGE_TOKEN,
    QUERY_TOKEN,
    add_flashsloth_tokens,
    build_processor,
)


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "FLASHSLOTH_TOKENS",
    "IMAGE_TOKEN",
    "QUERY_TOKEN",
    "FlashSlothImageProcessor",
    "FlashSlothImageProcessorKwargs",
    "FlashSlothProcessor",
    "FlashSlothProcessorKwargs",
    "add_flashsloth_tokens",
    "build_processor",
]
