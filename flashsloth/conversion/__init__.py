"""Conversion of the released FlashSloth checkpoints, building from components, and HF-native checkpoint export.

The functions are imported on first use, so that the `flashsloth` command line starts without loading torch.
"""

import importlib


_EXPORTS = {
    "ConversionError": ".convert",
    "build_from_components": ".build",
    "convert_original_checkpoint": ".convert",
    "default_generation_config": ".export",
    "push_folder_to_hub": ".hub",
    "render_model_card": ".export",
    "save_native_checkpoint": ".export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
