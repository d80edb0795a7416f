"""The benchmark's workloads: the sizes, the FlashSloth model and its peers (the uncompressed LLaVA-style twin and
the optional SmolVLM-sized one) built with shared random weights, and their prompts."""

from dataclasses import dataclass


SIZES = ("tiny", "overhead", "small", "full")
VARIANTS = ("base", "hd")
MODEL_NAMES = ("flashsloth", "peer")
TILED_PEER = "smolvlm"  # the optional SmolVLM-sized peer, in one variant only (base unless HD runs alone)
MODEL_LABELS = {"flashsloth": "FlashSloth", "peer": "uncompressed peer", TILED_PEER: "SmolVLM-sized peer"}
ADVANTAGE_KEYS = {"peer": "advantage", TILED_PEER: "advantage_smolvlm"}  # FlashSloth's advantage over each peer
VARIANT_CROPS = {"base": 1, "hd": 5}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")


# The peer's HD prompt (3645 image tokens) is longer than Phi-2's 2048 positions; rotary embeddings extend as is.
MAX_POSITIONS = 4096
TOKEN_ID_RANGE = (1000, 50000)  # random prompt text, clear of the placeholder and anchor ids


# SmolVLM-Instruct's language model, SmolLM2-1.7B (its vision tower is FlashSloth's SigLIP so400m/14-384, all 27
# layers), and the layout its processor gives one image at the default size: a 4 x 4 grid of 384-pixel tiles, each
# `<fake_token_around_image><row_i_col_j>` + 81 image tokens, a newline after each row, then
# `\n<fake_token_around_image><global-img>` + 81 image tokens + `<fake_token_around_image>` for the whole image.
SMOLLM2_1_7B = {
    "model_type": "llama",
    "vocab_size": 49280,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rope_theta": 273768.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "pad_token_id": 2,
}

SMOLVLM_SCALE_FACTOR = 3
SMOLVLM_TILE_GRID = 4
SMOLVLM_TOKEN_IDS = {"newline": 198, "fake": 49189, "global": 49188, "image": 49190, "first_row_col": 49200}
SMOLVLM_TEXT_ID_RANGE = (1000, 49000)


@dataclass(frozen=True)
class SizeSpec:
    """Overrides of the published SigLIP so400m and Phi-2 configs for one benchmark size."""

    vision: dict
    text: dict
    query_layer_index: int
    query_hidden_size: int
    tiled_peer_layers: tuple[int, int]  # encoder and decoder layers of the SmolVLM-sized peer
    description: str


SIZE_SPECS = {
    "tiny": SizeSpec(
        vision={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3},
        text={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "num_hidden_layers": 2,
        },
        query_layer_index=1,
        query_hidden_size=32,
        tiled_peer_layers=(2, 2),
        description="full token geometry and vocabulary, tiny widths (SigLIP 32, Phi 64), 2 encoder + 2 decoder layers",
    ),
    "overhead": SizeSpec(
        vision={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
        text={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4},
        query_layer_index=7,
        query_hidden_size=32,
        tiled_peer_layers=(27, 24),
        description="full depths (26 of 27 encoder layers used, 32 decoder layers, EmbQ before layer 7) and full "
        "token geometry with tiny widths (SigLIP 32, Phi 64): what is timed is dispatch and Python, not arithmetic",
    ),
    "small": SizeSpec(
        vision={"num_hidden_layers": 4},
        text={"num_hidden_layers": 4},
        query_layer_index=1,
        query_hidden_size=576,
        tiled_peer_layers=(3, 3),
        description="full widths (SigLIP 1152, Phi 2560, vocabulary 51200), depths cut by 8: 3 of 26 encoder layers "
        "used, 4 of 32 decoder layers, EmbQ before decoder layer 1 of 4 (7 of 32); SmolVLM-sized peer: 3 of 27 and 3 "
        "of 24",
    ),
    "full": SizeSpec(
        vision={},
        text={},
        query_layer_index=7,
        query_hidden_size=576,
        tiled_peer_layers=(27, 24),
        description="SigLIP so400m/14-384 (26 of 27 encoder layers used) + Phi-2 (32 layers, 2560 wide)",
    ),
}


@dataclass(frozen=True)
class PromptLayout:
    """
    Token counts of the one-turn prompt around the image, as the real Phi-2 tokenizer gives them:
    `{system} USER: <image>\\n{question}<learnable> ASSISTANT:` with a 13-token question.
    """

    prefix_tokens: int = 32  # system prompt and "USER: " (the image lands at index 32)
    newline_tokens: int = 1
    question_tokens: int = 13  # e.g. "What is the man in the picture holding in his right hand?"
    suffix_tokens: int = 4  # " ASSISTANT:"

    @property
    def text_tokens(self) -> int:
        return self.prefix_tokens + self.newline_tokens + self.question_tokens + self.suffix_tokens


# ----------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------------


def benchmark_configs(size: str):
    """The FlashSloth config of a benchmark size and the config of its uncompressed peer (a `LlavaConfig`)."""
    from transformers import LlavaConfig

    from ..configuration_flashsloth import PHI_2, SIGLIP_SO400M_384, FlashSlothConfig

    spec = SIZE_SPECS[size]
    flashsloth_config = FlashSlothConfig(
        vision_config={**SIGLIP_SO400M_384, **spec.vision},
        text_config={**PHI_2, **spec.text, "max_position_embeddings": MAX_POSITIONS},
        query_layer_index=spec.query_layer_index,
        query_hidden_size=spec.query_hidden_size,
    )
    # The peer reads the same layer (-2 of the full encoder) the way Imp and Bunny do: the unused last layer is dropped
    # and the output of the last one kept is read, un-pooled, all patches ("full": SigLIP has no CLS token to drop).
    # The index is non-negative because the shared tower's config still counts the dropped layer.
    vision_config = flashsloth_config.vision_config.to_dict()
    vision_config["num_hidden_layers"] = flashsloth_config.num_vision_layers
    peer_config = LlavaConfig(
        vision_config=vision_config,
        text_config=flashsloth_config.text_config.to_dict(),
        image_token_index=flashsloth_config.image_token_id,
        image_seq_length=flashsloth_config.patch_grid_size**2,
        vision_feature_layer=flashsloth_config.num_vision_layers,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    return flashsloth_config, peer_config


def build_models(size: str, dtype, device, attn_implementation: str = "sdpa", seed: int = 0):
    """
    FlashSloth with random weights, and the native Llava peer sharing its vision tower (cut at the feature layer, as
    FlashSloth builds it), projector, decoder and head. Returns `(flashsloth, peer)`, both in eval mode.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from ..modeling_flashsloth import FlashSlothForConditionalGeneration

    flashsloth_config, peer_config = benchmark_configs(size)
    torch.manual_seed(seed)
    with torch.device(device):
        flashsloth = FlashSlothForConditionalGeneration._from_config(
            flashsloth_config, dtype=dtype, attn_implementation=attn_implementation
        )
    with torch.device("meta"):
        peer = LlavaForConditionalGeneration._from_config(
            peer_config, dtype=dtype, attn_implementation=attn_implementation
        )
    return flashsloth.eval(), share_modules(flashsloth, peer).eval()


def share_modules(flashsloth, peer):
    """Give the peer (built on the meta device) FlashSloth's vision tower, projector, decoder and head; returns it."""
    peer.model.vision_tower = flashsloth.model.vision_tower
    peer.model.multi_modal_projector.linear_1 = flashsloth.model.multi_modal_projector.linear_1
    peer.model.multi_modal_projector.linear_2 = flashsloth.model.multi_modal_projector.linear_2
    peer.model.language_model = flashsloth.model.language_model
    peer.lm_head = flashsloth.lm_head
    left_on_meta = [name for name, tensor in [*peer.named_parameters(), *peer.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"The peer has modules not shared with FlashSloth: {left_on_meta[:5]}")
    return peer


def tiled_peer_config(size: str):
    """The config of the SmolVLM-sized peer (a `SmolVLMConfig`) at a benchmark size: the same SigLIP widths as
    FlashSloth's, SmolLM2-1.7B, both depths cut like FlashSloth's."""
    from transformers import SmolVLMConfig

    from ..configuration_flashsloth import SIGLIP_SO400M_384

    spec = SIZE_SPECS[size]
    vision_layers, text_layers = spec.tiled_peer_layers
    vision_config = {**SIGLIP_SO400M_384, **spec.vision}
    vision_config = {key: value for key, value in vision_config.items() if key not in ("model_type", "vision_use_head")}
    text_config = {**SMOLLM2_1_7B, **spec.text, "max_position_embeddings": MAX_POSITIONS}
    return SmolVLMConfig(
        vision_config={**vision_config, "num_hidden_layers": vision_layers},
        text_config={**text_config, "num_hidden_layers": text_layers},
        scale_factor=SMOLVLM_SCALE_FACTOR,
        image_token_id=SMOLVLM_TOKEN_IDS["image"],
        pad_token_id=SMOLLM2_1_7B["pad_token_id"],  # SmolVLMConfig's default is a Llama-3 id, outside this vocabulary
        tie_word_embeddings=False,
    )


def build_tiled_peer(size: str, dtype, device, attn_implementation: str = "sdpa", seed: int = 0):
    """The SmolVLM-sized peer with random weights of its own, in eval mode."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(seed + 1)
    with torch.device(device):
        model = SmolVLMForConditionalGeneration._from_config(
            tiled_peer_config(size), dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def tiled_peer_tile_tokens(config) -> int:
    """Tokens of one SmolVLM tile: its patch grid, shrunk by the pixel shuffle's factor on each side."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    return (grid // config.scale_factor) ** 2


def visual_tokens(config, model_name: str, num_crops: int) -> int:
    """Tokens an image puts into the language model: FlashSloth's pooled tokens plus its query block, all patches for
    the uncompressed peer, or the SmolVLM-sized peer's tiles (`config` is that model's config)."""
    if model_name == "flashsloth":
        return config.image_tokens_per_crop * num_crops + config.num_query_tokens
    if model_name == TILED_PEER:
        return (SMOLVLM_TILE_GRID**2 + 1) * tiled_peer_tile_tokens(config)
    return config.patch_grid_size**2 * num_crops


def prompt_length(config, model_name: str, num_crops: int, layout: PromptLayout) -> int:
    return layout.text_tokens + visual_tokens(config, model_name, num_crops)


def build_inputs(config, model_name: str, num_crops: int, batch_size: int, layout: PromptLayout, seed: int = 0):
    """
    Model inputs of a one-turn prompt per sample, placeholders already expanded: FlashSloth's image tokens (81 per
    crop), newline, question, query block, " ASSISTANT:", with the instruction mask on the question; the peer's has
    729 image tokens per crop and no query block. `config` is the FlashSloth config. CPU tensors.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)

    def text(length: int) -> torch.Tensor:
        return torch.randint(*TOKEN_ID_RANGE, (batch_size, length), generator=generator)

    if model_name == "flashsloth":
        image_tokens = config.image_tokens_per_crop * num_crops
        query = torch.full((batch_size, config.num_query_tokens), config.query_token_id)
    else:
        image_tokens = config.patch_grid_size**2 * num_crops
        query = torch.zeros(batch_size, 0, dtype=torch.long)
    prefix, newline = text(layout.prefix_tokens), text(layout.newline_tokens)
    question, suffix = text(layout.question_tokens), text(layout.suffix_tokens)
    image = torch.full((batch_size, image_tokens), config.image_token_id)
    input_ids = torch.cat([prefix, image, newline, question, query, suffix], dim=1)
    size = config.vision_config.image_size
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.rand(batch_size * num_crops, 3, size, size, generator=generator) * 2 - 1,
    }
    if model_name == "flashsloth":
        question_start = layout.prefix_tokens + image_tokens + layout.newline_tokens
        instruction_mask = torch.zeros_like(input_ids)
        instruction_mask[:, question_start : question_start + layout.question_tokens] = 1
        inputs["instruction_mask"] = instruction_mask
        inputs["image_num_crops"] = torch.full((batch_size,), num_crops)
    return inputs


def build_tiled_peer_inputs(config, batch_size: int, layout: PromptLayout, seed: int = 0):
    """
    Model inputs of the SmolVLM-sized peer for the same one-turn prompt: the text around the image as in
    `build_inputs`, the image as its processor lays out 4 x 4 tiles and the whole image (see `SMOLVLM_TOKEN_IDS`), and
    `pixel_values` of shape (batch, 17 tiles, 3, 384, 384). `config` is the peer's config. CPU tensors.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)

    def text(length: int) -> torch.Tensor:
        return torch.randint(*SMOLVLM_TEXT_ID_RANGE, (batch_size, length), generator=generator)

    ids = SMOLVLM_TOKEN_IDS
    tile = [ids["image"]] * tiled_peer_tile_tokens(config)
    image_layout = []
    for row in range(SMOLVLM_TILE_GRID):
        for column in range(SMOLVLM_TILE_GRID):
            image_layout += [ids["fake"], ids["first_row_col"] + row * SMOLVLM_TILE_GRID + column, *tile]
        image_layout.append(ids["newline"])
    image_layout += [ids["newline"], ids["fake"], ids["global"], *tile, ids["fake"]]
    image = torch.tensor(image_layout).expand(batch_size, -1)
    prefix, newline = text(layout.prefix_tokens), text(layout.newline_tokens)
    question, suffix = text(layout.question_tokens), text(layout.suffix_tokens)
    input_ids = torch.cat([prefix, image, newline, question, suffix], dim=1)
    size, tiles = config.vision_config.image_size, SMOLVLM_TILE_GRID**2 + 1
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.rand(batch_size, tiles, 3, size, size, generator=generator) * 2 - 1,
    }


def move_inputs(inputs: dict, device, dtype) -> dict:
    return {
        name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for name, value in inputs.items()
    }
