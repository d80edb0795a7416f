"""Training FlashSloth on transformers' Trainer: LLaVA-format data, the paper's two stages, LoRA, several processes.

The names below are imported on first use, so that `flashsloth --help` does not load torch and transformers.
"""

import importlib


_EXPORTS = {
    "FlashSlothDataCollator": ".data",
    "LlavaDataset": ".data",
    "llava_to_messages": ".data",
    "configure_trainable": ".stages",
    "format_trainable_table": ".stages",
    "FlashSlothTrainer": ".trainer",
    "build_trainer": ".trainer",
    "last_complete_checkpoint": ".trainer",
    "train": ".trainer",
    "apply_lora": ".lora",
    "load_adapter": ".lora",
    "load_model_for_qlora": ".lora",
    "lora_config": ".lora",
    "merge_lora": ".lora",
    "save_adapter": ".lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
