"""FlashSloth model configuration."""

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Published SigLIP so400m/14 at 384 px (google/siglip-so400m-patch14-384), vision tower only.
SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": False,
}

# microsoft/phi-2.
PHI_2 = {
    "model_type": "phi",
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "partial_rotary_factor": 0.4,
    "rope_theta": 10000.0,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "qk_layernorm": False,
    "tie_word_embeddings": False,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}


def _as_config(value, default: dict, name: str) -> PretrainedConfig:
    if value is None:
        value = dict(default)
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict or a PretrainedConfig, got {type(value).__name__}.")
    value = dict(value)
    model_type = value.pop("model_type", default["model_type"])
    return AutoConfig.for_model(model_type, **value)


# Which class each Auto class loads from a saved folder (the remote-code files are copied beside config.json).
AUTO_MAP = {
    "AutoConfig": "configuration_flashsloth.FlashSlothConfig",
    "AutoModel": "modeling_flashsloth.FlashSlothModel",
    "AutoModelForCausalLM": "modeling_flashsloth.FlashSlothForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_flashsloth.FlashSlothForConditionalGeneration",
}


class FlashSlothConfig(PretrainedConfig):
    r"""
    Configuration of a FlashSloth model: a SigLIP vision encoder whose 27x27 patch grid is compressed by Spatial
    Attention Pooling (SAP) into one token per 3x3 window, an MLP projector, a decoder-only language model (Phi-2 by
    default) and a block of learned query tokens refined by the Embedded Query module (EmbQ) inside the decoder.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            The vision encoder (SigLIP). Defaults to SigLIP so400m/14 at 384 px.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            The language model; any decoder known to `AutoConfig` by its `model_type`. Defaults to Phi-2.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Index into the encoder's hidden states whose output (without post-layernorm) feeds SAP and EmbQ. Encoder
            layers after it are not built.
        pooling_window (`int`, *optional*, defaults to 3):
            Side of the non-overlapping SAP windows; it must divide the patch grid side.
        projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
            `"mlp2x_gelu"` (Linear, exact GELU, Linear) or `"linear"`.
        num_query_tokens (`int`, *optional*, defaults to 9):
            Learned query tokens per query block.
        query_anchor_token_id (`int`, *optional*, defaults to 764):
            Token whose input embedding is added to every learned query token.
        query_layer_index (`int`, *optional*, defaults to 7):
            EmbQ refines the query tokens on the hidden states entering this decoder layer, at prefill.
        query_hidden_size (`int`, *optional*, defaults to 576):
            Width of EmbQ's attention.
        query_num_heads (`int`, *optional*):
            EmbQ attention heads; defaults to the language model's `num_attention_heads`.
        image_token_id (`int`, *optional*, defaults to 50297):
            Placeholder id the processor repeats once per image token.
        query_token_id (`int`, *optional*, defaults to 50295):
            Placeholder id the processor repeats once per query token (`<learnable>`).
        num_crops (`int`, *optional*, defaults to 1):
            Crops per image the checkpoint was trained with: 1 (one 384x384 view) or 5 (HD: global view + 2x2).
        pooling_dropout (`float`, *optional*, defaults to 0.1):
            Dropout between the two SAP score layers, active in training only.
        lm_head_bias (`bool`, *optional*, defaults to `True`):
            Whether the language modeling head has a bias (Phi-2 has one, Llama-family decoders do not).
        pooling_type (`str`, *optional*, defaults to `"attention"`):
            `"attention"` (SAP) or `"average"` (plain mean of each window; an ablation, not a released model).
        use_embedded_query (`bool`, *optional*, defaults to `True`):
            Whether EmbQ refines the query tokens; `False` keeps the learned query tokens as they are (an ablation).
    """

    model_type = "flashsloth"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        vision_feature_layer: int = -2,
        pooling_window: int = 3,
        projector_type: str = "mlp2x_gelu",
        num_query_tokens: int = 9,
        query_anchor_token_id: int = 764,
        query_layer_index: int = 7,
        query_hidden_size: int = 576,
        query_num_heads: int | None = None,
        image_token_id: int = 50297,
        query_token_id: int = 50295,
        num_crops: int = 1,
        pooling_dropout: float = 0.1,
        lm_head_bias: bool = True,
        pooling_type: str = "attention",
        use_embedded_query: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vision_config = _as_config(vision_config, SIGLIP_SO400M_384, "vision_config")
        # FlashSloth reads patch features; SigLIP's attention-pooling head is never used, so it is not built.
        self.vision_config.vision_use_head = False
        self.text_config = _as_config(text_config, PHI_2, "text_config")
        self.vision_feature_layer = vision_feature_layer
        self.pooling_window = pooling_window
        self.projector_type = projector_type
        self.num_query_tokens = num_query_tokens
        self.query_anchor_token_id = query_anchor_token_id
        self.query_layer_index = query_layer_index
        self.query_hidden_size = query_hidden_size
        self.query_num_heads = query_num_heads or self.text_config.num_attention_heads
        self.image_token_id = image_token_id
        self.query_token_id = query_token_id
        self.num_crops = num_crops
        self.pooling_dropout = pooling_dropout
        self.lm_head_bias = lm_head_bias
        self.pooling_type = pooling_type
        self.use_embedded_query = use_embedded_query
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate_flashsloth()

    @property
    def num_vision_layers(self) -> int:
        """Encoder layers actually built: those up to and including `vision_feature_layer`."""
        total = self.vision_config.num_hidden_layers
        return total + 1 + self.vision_feature_layer if self.vision_feature_layer < 0 else self.vision_feature_layer

    @property
    def patch_grid_size(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_tokens_per_crop(self) -> int:
        return (self.patch_grid_size // self.pooling_window) ** 2

    def _validate_flashsloth(self):
        problems = []
        if not 1 <= self.num_vision_layers <= self.vision_config.num_hidden_layers:
            problems.append(
                f"vision_feature_layer={self.vision_feature_layer} selects no encoder layer of the "
                f"{self.vision_config.num_hidden_layers} in vision_config"
            )
        if self.pooling_window < 1 or self.patch_grid_size % self.pooling_window:
            problems.append(
                f"pooling_window={self.pooling_window} must divide the patch grid side {self.patch_grid_size} "
                "(image_size // patch_size)"
            )
        if self.pooling_type not in ("attention", "average"):
            problems.append(f"pooling_type={self.pooling_type!r} is not one of 'attention', 'average'")
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            problems.append(f"projector_type={self.projector_type!r} is not one of 'mlp2x_gelu', 'linear'")
        if not 0 <= self.query_layer_index < self.text_config.num_hidden_layers:
            problems.append(
                f"query_layer_index={self.query_layer_index} is not a decoder layer index "
                f"(the text model has {self.text_config.num_hidden_layers} layers)"
            )
        if self.query_hidden_size % self.query_num_heads or self.vision_config.hidden_size % self.query_num_heads:
            problems.append(
                f"query_num_heads={self.query_num_heads} must divide query_hidden_size={self.query_hidden_size} "
                f"and the vision width {self.vision_config.hidden_size}"
            )
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "query_token_id", "query_anchor_token_id"):
            if not 0 <= getattr(self, name) < vocab_size:
                problems.append(f"{name}={getattr(self, name)} is outside the vocabulary (size {vocab_size})")
        if self.image_token_id == self.query_token_id:
            problems.append("image_token_id and query_token_id must differ")
        if self.num_crops not in (1, 5):
            problems.append(f"num_crops={self.num_crops} must be 1 (one view) or 5 (HD)")
        if problems:
            raise ValueError("Invalid FlashSlothConfig: " + "; ".join(problems) + ".")


FlashSlothConfig.register_for_auto_class()

__all__ = ["FlashSlothConfig"]
