"""The released FlashSloth checkpoints' layout (the research code's names and config) and its mapping to this package."""

import re

from flashsloth.configuration_flashsloth import SIGLIP_SO400M_384, FlashSlothConfig


# (pattern, replacement) applied in order with `re.sub`, first match wins. Every original key matches exactly one.
ORIGINAL_KEY_MAPPING: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.pooling\.mlp\.0\.", "model.spatial_pooling.fc1."),
    (r"^model\.pooling\.mlp\.3\.", "model.spatial_pooling.fc2."),
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.learnable_tokens\.token$", "model.query_tokens"),
    (r"^model\.lqformer\.down_projector_learnable_text\.", "model.embedded_query.text_down_proj."),
    (r"^model\.lqformer\.down_projector_image\.", "model.embedded_query.image_down_proj."),
    (r"^model\.lqformer\.layers\.0\.t2q_attn\.", "model.embedded_query.text_attention."),
    (r"^model\.lqformer\.layers\.0\.i2q_attn\.", "model.embedded_query.image_attention."),
    (r"^model\.lqformer\.layers\.0\.ln_text\.", "model.embedded_query.text_norm."),
    (r"^model\.lqformer\.layers\.0\.ln_q\.", "model.embedded_query.query_norm."),
    (r"^model\.lqformer\.layers\.0\.ln_kv\.", "model.embedded_query.image_norm."),
    (r"^model\.lqformer\.up_projector\.", "model.embedded_query.up_proj."),
    (r"^model\.layers\.", "model.language_model.layers."),
    (r"^model\.embed_tokens\.", "model.language_model.embed_tokens."),
    (r"^model\.final_layernorm\.", "model.language_model.final_layernorm."),
    (r"^lm_head\.", "lm_head."),
]

# The Hub ids the released configs name in `mm_vision_tower`, with their published vision configs.
KNOWN_VISION_TOWERS = {"google/siglip-so400m-patch14-384": SIGLIP_SO400M_384}

# Fields of the original (Phi + LLaVA-style) config that describe the language model.
_PHI_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "layer_norm_eps",
    "partial_rotary_factor",
    "rope_theta",
    "qk_layernorm",
    "resid_pdrop",
    "embd_pdrop",
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)


def convert_original_key(name: str) -> str | None:
    """The native name of an original checkpoint key, or `None` if it is not part of the original layout."""
    for pattern, replacement in ORIGINAL_KEY_MAPPING:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def convert_original_state_dict(state_dict: dict) -> dict:
    """Rename every tensor of an original state dict; raise listing the keys that have no native name."""
    unmapped = [name for name in state_dict if convert_original_key(name) is None]
    if unmapped:
        raise KeyError(f"{len(unmapped)} keys are not in the original FlashSloth layout: {unmapped[:10]}")
    return {convert_original_key(name): tensor for name, tensor in state_dict.items()}


def flashsloth_config_from_original(original_config: dict, vision_config: dict | None = None) -> FlashSlothConfig:
    """
    Build a `FlashSlothConfig` from an original `config.json` (either `model_type` `phi` as on the Hub or
    `flashsloth` as the research code writes it). `vision_config` is the SigLIP config of `mm_vision_tower`; when
    omitted, the published config of a known Hub id is used.
    """
    if vision_config is None:
        tower = original_config.get("mm_vision_tower")
        if tower not in KNOWN_VISION_TOWERS:
            raise ValueError(
                f"The vision tower {tower!r} named by mm_vision_tower is not a known Hub id "
                f"({', '.join(KNOWN_VISION_TOWERS)}): provide its SigLIP config (a vision_config.json)."
            )
        vision_config = KNOWN_VISION_TOWERS[tower]
    vision_config = {key: value for key, value in vision_config.items() if key not in ("architectures", "torch_dtype")}
    vision_config["model_type"] = "siglip_vision_model"
    text_config = {field: original_config[field] for field in _PHI_FIELDS if field in original_config}
    text_config["model_type"] = "phi"
    image_hd = bool(original_config.get("image_hd", original_config.get("model_hd", False)))
    return FlashSlothConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=original_config.get("mm_vision_select_layer", -2),
        projector_type=original_config.get("mm_projector_type", "mlp2x_gelu"),
        image_token_id=original_config.get("image_token_index", 50297),
        query_token_id=50295,
        num_crops=5 if image_hd else 1,
        lm_head_bias=True,
        tie_word_embeddings=original_config.get("tie_word_embeddings", False),
    )
