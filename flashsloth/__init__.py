"""FlashSloth for Hugging Face transformers: configuration, models, processing and conversion.

The model classes are imported on first use, so that `flashsloth --help` and other light entry points start
without loading torch and transformers.
"""

import importlib


_EXPORTS = {
    "FlashSlothConfig": ".configuration_flashsloth",
    "FlashSlothForConditionalGeneration": ".modeling_flashsloth",
    "FlashSlothModel": ".modeling_flashsloth",
    "FlashSlothPreTrainedModel": ".modeling_flashsloth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
