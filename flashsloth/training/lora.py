"""LoRA and QLoRA for FlashSloth with peft.

LoRA adapters go on the language model's linear layers only (the vision tower, SAP and EmbQ have layers with the
same names, `q_proj`, `fc1`, ...: the target pattern is anchored at `language_model.layers`). SAP, the projector and
EmbQ train fully as peft `modules_to_save`. The query tokens are a bare `nn.Parameter`, which peft cannot wrap: they
stay trainable through `requires_grad` and are written into the adapter file under their model key, which
`PeftModel.from_pretrained` / `load_adapter` load back as they are (peft passes keys that are not adapter weights
through to `load_state_dict`).
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Phi's attention (q_proj, k_proj, v_proj, dense) and MLP (fc1, fc2) linear layers.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
MODULES_TO_SAVE = ("spatial_pooling", "multi_modal_projector", "embedded_query")
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# The query tokens' key in a peft adapter file (the model key under peft's `base_model.model.` prefix).
QUERY_TOKENS_ADAPTER_KEY = "base_model.model.model.query_tokens"
# Modules QLoRA keeps in full precision: everything but the language model's decoder layers.
QLORA_SKIP_MODULES = ("vision_tower", "spatial_pooling", "multi_modal_projector", "embedded_query", "lm_head")


def _require_peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA training needs peft: `pip install peft` (or the package's `[peft]` extra).") from error
    return peft


def language_model_target_pattern(target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> str:
    """A peft `target_modules` regex matching the named linear layers inside the language model's decoder layers."""
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"`target_modules` must be a non-empty list of layer names, got {target_modules!r}.")
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"(?:.*\.)?language_model\.layers\.\d+\.(?:.*\.)?(?:{names})"


def lora_config(
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    train_vision_tower: bool = False,
):
    """
    A peft `LoraConfig` for FlashSloth's stage 2.

    Args:
        rank: LoRA rank `r`.
        alpha: LoRA scaling numerator; defaults to `2 * rank`.
        dropout: dropout on the LoRA input.
        target_modules: names of the language model's linear layers that get adapters (Phi: q_proj, k_proj, v_proj,
            dense, fc1, fc2; Llama-style decoders: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
        train_vision_tower: also train the whole vision tower (as a module to save).
    """
    peft = _require_peft()
    if rank < 1:
        raise ValueError(f"The LoRA rank must be at least 1, got {rank}.")
    modules_to_save = list(MODULES_TO_SAVE) + (["vision_tower"] if train_vision_tower else [])
    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=language_model_target_pattern(target_modules),
        modules_to_save=modules_to_save,
        bias="none",
    )


def query_tokens_parameter(model: nn.Module) -> nn.Parameter:
    """The query tokens of a FlashSloth model, bare or wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.query_tokens


def apply_lora(model: nn.Module, config=None) -> nn.Module:
    """
    Wrap a FlashSloth model with LoRA adapters (`config` from [`lora_config`], or its defaults) and make the query
    tokens trainable. Everything else is frozen by peft. Returns the `PeftModel`.
    """
    peft = _require_peft()
    config = config if config is not None else lora_config()
    if not getattr(config, "modules_to_save", None):
        logger.warning("The LoRA config has no `modules_to_save`: SAP, the projector and EmbQ will stay frozen.")
    peft_model = peft.get_peft_model(model, config)
    query_tokens_parameter(peft_model).requires_grad_(True)
    return peft_model


def add_query_tokens_to_adapter(peft_model: nn.Module, adapter_dir: str | os.PathLike):
    """Write the query tokens into the adapter file that `peft_model.save_pretrained(adapter_dir)` wrote."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {ADAPTER_WEIGHTS_NAME} in {adapter_dir}: save the adapter with safetensors first."
        )
    tensors = load_file(path)
    tensors[QUERY_TOKENS_ADAPTER_KEY] = query_tokens_parameter(peft_model).detach().to("cpu").contiguous()
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, temporary, metadata={"format": "pt"})
    os.replace(temporary, path)


def save_adapter(peft_model: nn.Module, adapter_dir: str | os.PathLike, is_main_process: bool = True):
    """Save the LoRA adapter, the modules to save and the query tokens (load with `PeftModel.from_pretrained`)."""
    peft_model.save_pretrained(adapter_dir, is_main_process=is_main_process)
    if is_main_process:
        add_query_tokens_to_adapter(peft_model, adapter_dir)


def load_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> nn.Module:
    """
    Load a saved FlashSloth adapter on top of a base model (the same as `PeftModel.from_pretrained`, with a check that
    the query tokens were restored).
    """
    peft = _require_peft()
    adapter_file = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    if not adapter_file.is_file():
        raise FileNotFoundError(f"No adapter found in {adapter_dir} (expected {ADAPTER_WEIGHTS_NAME}).")
    peft_model = peft.PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    saved = load_file(adapter_file).get(QUERY_TOKENS_ADAPTER_KEY)
    if saved is None:
        logger.warning(f"{adapter_file} has no query tokens: the base model's are kept.")
    elif not torch.equal(saved.to(query_tokens_parameter(peft_model).device), query_tokens_parameter(peft_model).data):
        raise RuntimeError(f"The query tokens of {adapter_file} were not loaded; is peft older than 0.17?")
    if is_trainable:
        query_tokens_parameter(peft_model).requires_grad_(True)
    return peft_model


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and return the plain FlashSloth model (save it like any checkpoint)."""
    return peft_model.merge_and_unload()


def load_model_for_qlora(model_dir: str | os.PathLike, compute_dtype: torch.dtype = torch.bfloat16, **kwargs):
    """
    Load a FlashSloth checkpoint for QLoRA: the language model's linear layers in 4-bit NF4 (bitsandbytes), the
    vision tower, SAP, projector, EmbQ and lm_head in `compute_dtype`, prepared for k-bit training. Wrap the result
    with [`apply_lora`].

    Raises:
        `ImportError`: bitsandbytes is not installed. `RuntimeError`: no CUDA GPU is available (bitsandbytes' 4-bit
        layers need one).
    """
    peft = _require_peft()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "QLoRA needs bitsandbytes and a CUDA GPU: `pip install bitsandbytes`, or use --lora."
        ) from error
    if not torch.cuda.is_available():
        raise RuntimeError(
            "QLoRA needs a CUDA GPU (bitsandbytes' 4-bit layers run on GPU); use plain LoRA on the CPU."
        )
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, quantization_config=quantization_config, dtype=compute_dtype, trust_remote_code=True, **kwargs
    )
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
