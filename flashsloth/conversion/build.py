"""Build a new FlashSloth from a pretrained SigLIP encoder and a pretrained decoder (the paper's stage 0)."""

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, SiglipVisionModel
from transformers.utils import logging

from flashsloth.configuration_flashsloth import FlashSlothConfig
from flashsloth.modeling_flashsloth import FlashSlothForConditionalGeneration
from flashsloth.processing import add_flashsloth_tokens, build_processor

from .export import default_generation_config


logger = logging.get_logger(__name__)

SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")
# The released model anchors its query tokens on token 764 of Phi-2 (" ."), and runs EmbQ before layer 7 of 32.
QUERY_ANCHOR_TEXT = " ."
PHI2_QUERY_LAYER_INDEX, PHI2_NUM_LAYERS = 7, 32


def default_query_anchor_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """
    The token whose embedding is added to every query token: the last token of `" ."`. With Phi-2's tokenizer this is
    764, the released model's anchor; with other tokenizers it is their own full stop (e.g. `"."` for Llama's).
    """
    ids = tokenizer.encode(QUERY_ANCHOR_TEXT, add_special_tokens=False)
    if not ids:
        raise ValueError(f"The tokenizer encodes {QUERY_ANCHOR_TEXT!r} to no token: pass query_anchor_token_id.")
    return ids[-1]


def default_query_layer_index(num_hidden_layers: int) -> int:
    """EmbQ's layer at the released model's relative depth (7 of 32): 7 for Phi-2, 5 for 24 layers, 0 for 2."""
    return min(round(num_hidden_layers * PHI2_QUERY_LAYER_INDEX / PHI2_NUM_LAYERS), num_hidden_layers - 1)


def load_vision_tower(vision_model: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> SiglipVisionModel:
    """A `SiglipVisionModel` from a SigLIP vision checkpoint or a full SigLIP (image + text) checkpoint."""
    model_type = AutoConfig.from_pretrained(vision_model).model_type
    if model_type not in SIGLIP_MODEL_TYPES:
        raise ValueError(
            f"{vision_model} holds a {model_type!r} model; FlashSloth's vision encoder must be SigLIP "
            f"(model_type {' or '.join(SIGLIP_MODEL_TYPES)}), e.g. google/siglip-so400m-patch14-384."
        )
    return SiglipVisionModel.from_pretrained(vision_model, dtype=torch_dtype)


def _load_tokenizer(tokenizer, text_model) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return AutoTokenizer.from_pretrained(tokenizer if tokenizer is not None else text_model)


def _copy_vision_weights(model: FlashSlothForConditionalGeneration, vision_tower: SiglipVisionModel):
    """Copy the encoder layers FlashSloth keeps; the later layers, post-layernorm and head are not used."""
    target = model.model.vision_tower
    expected = target.state_dict().keys()
    state_dict = {name: tensor for name, tensor in vision_tower.state_dict().items() if name in expected}
    target.load_state_dict(state_dict, strict=True)


def _copy_text_weights(model: FlashSlothForConditionalGeneration, text_model, vocab_size: int):
    """Copy the decoder and its head; rows of tokens added to the vocabulary start as the mean of the old rows."""
    old_size = text_model.config.vocab_size
    if old_size < vocab_size:
        text_model.resize_token_embeddings(vocab_size, mean_resizing=False)
        with torch.no_grad():
            for module in (text_model.get_input_embeddings(), text_model.get_output_embeddings()):
                module.weight[old_size:] = module.weight[:old_size].mean(dim=0)
                if getattr(module, "bias", None) is not None:
                    module.bias[old_size:] = module.bias[:old_size].mean()
    decoder = getattr(text_model, text_model.base_model_prefix)
    model.model.language_model.load_state_dict(decoder.state_dict(), strict=True)
    if not model.config.tie_word_embeddings:
        model.lm_head.load_state_dict(text_model.get_output_embeddings().state_dict(), strict=True)


def build_from_components(
    vision_model: str | os.PathLike,
    text_model: str | os.PathLike,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    *,
    image_hd: bool = False,
    image_aspect_ratio: str = "square",
    torch_dtype: torch.dtype | None = None,
    **config_overrides,
):
    """
    Build a new FlashSloth from a pretrained SigLIP encoder and a pretrained decoder-only language model.

    The encoder and decoder keep their pretrained weights; SAP, the projector, the query tokens and EmbQ are freshly
    initialised (normal(0, `initializer_range`) weights, zero biases, identity LayerNorms). The tokenizer gets the
    `<learnable>`, `</s>` and `<image>` tokens ([`add_flashsloth_tokens`]); when that grows it past the decoder's
    vocabulary, the embeddings and the head are resized and the new rows start as the mean of the old ones.

    Defaults that follow the components: image size, image tokens per crop (patch grid / pooling window) and the
    vision feature layer from SigLIP; `lm_head_bias` from the decoder's head (Phi-2 has a bias, Llama-family decoders
    do not); `tie_word_embeddings` from the decoder; `query_layer_index` at the released model's relative depth (7 of
    32, see [`default_query_layer_index`]); `query_anchor_token_id` = the last token of `" ."` (764 with Phi-2, see
    [`default_query_anchor_token_id`]).

    Args:
        vision_model (`str` or `os.PathLike`): folder or Hub id of a SigLIP checkpoint (`SiglipVisionModel` or the
            full `SiglipModel`), e.g. `google/siglip-so400m-patch14-384`.
        text_model (`str` or `os.PathLike`): folder or Hub id of a causal language model, e.g. `microsoft/phi-2`.
        tokenizer (*optional*): folder, Hub id or tokenizer object (a fast tokenizer; modified in place); defaults to
            the text model's tokenizer.
        image_hd (`bool`, *optional*, defaults to `False`): five crops per image (FlashSloth-HD).
        image_aspect_ratio (`str`, *optional*, defaults to `"square"`): `"square"` or `"pad"`.
        torch_dtype (`torch.dtype`, *optional*): dtype of the built model; defaults to the text model's loaded dtype.
        config_overrides: any other [`FlashSlothConfig`] argument (e.g. `query_hidden_size`, `query_layer_index`).

    Returns:
        `(FlashSlothForConditionalGeneration, FlashSlothProcessor)`, the model in training mode.
    """
    tokenizer = add_flashsloth_tokens(_load_tokenizer(tokenizer, text_model))
    vision_tower = load_vision_tower(vision_model, torch_dtype)
    language_model = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch_dtype)
    text_config = language_model.config.to_dict()
    text_config["vocab_size"] = max(language_model.config.vocab_size, len(tokenizer))
    text_config["pad_token_id"] = tokenizer.pad_token_id
    vocabulary = tokenizer.get_vocab()
    values = dict(
        vision_config=vision_tower.config.to_dict(),
        text_config=text_config,
        query_layer_index=default_query_layer_index(language_model.config.num_hidden_layers),
        query_anchor_token_id=default_query_anchor_token_id(tokenizer),
        image_token_id=vocabulary["<image>"],
        query_token_id=vocabulary["<learnable>"],
        num_crops=5 if image_hd else 1,
        lm_head_bias=language_model.get_output_embeddings().bias is not None,
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(config_overrides)
    config = FlashSlothConfig(**values)

    model = FlashSlothForConditionalGeneration._from_config(config, dtype=torch_dtype or language_model.dtype)
    _copy_vision_weights(model, vision_tower)
    del vision_tower
    _copy_text_weights(model, language_model, config.text_config.vocab_size)
    del language_model
    model.tie_weights()

    processor = build_processor(
        tokenizer,
        image_hd=image_hd,
        image_aspect_ratio=image_aspect_ratio,
        image_size=config.vision_config.image_size,
        num_image_tokens_per_crop=config.image_tokens_per_crop,
        num_query_tokens=config.num_query_tokens,
    )
    model.generation_config = default_generation_config(processor)
    return model.train(), processor
