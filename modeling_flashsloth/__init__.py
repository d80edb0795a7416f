"""FlashSloth for Hugging Face transformers: configuration, models, processing and conversion."""

from .configuration_flashsloth import FlashSlothConfig
from .modeling_flashsloth import (
    FlashSlothForConditionalGeneration,
    FlashSlothModel,
    FlashSlothPreTrainedModel,
)


__all__ = [
    "FlashSlothConfig",
    "FlashSlothForConditionalGeneration",
    "FlashSlothModel",
    "FlashSlothPreTrainedModel",
]
