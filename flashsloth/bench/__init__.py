"""
Speed benchmark: FlashSloth side by side with an uncompressed peer built from the same encoder and language model.

The peer is transformers' native `LlavaForConditionalGeneration` with FlashSloth's own SigLIP, 2-layer GELU projector
and Phi (the Imp-v1-3B / Bunny-3B architecture): every 384x384 crop feeds all 27x27 = 729 patch features to the
language model, and for HD it gets FlashSloth-HD's 5 crops as 5 images (3645 tokens). Both models hold the same
random weights (the peer shares FlashSloth's modules, so one copy sits in memory), run in one process, interleaved,
after a warm-up, and every time is a median.

With `--smolvlm`, a second, tiled peer joins the base variant: transformers' native `SmolVLMForConditionalGeneration`
at the size of SmolVLM-Instruct (SigLIP so400m tiles, 3x3 pixel shuffle, SmolLM2-1.7B; random weights of its own) and
its processor's default tiling: the image's longest edge goes to 4 x 384 pixels, cut into 4 x 4 tiles, plus the whole
image as a 17th, 81 tokens each (1377).

    flashsloth bench --size small --json speed.json --markdown speed.md --plot speed.png
    python -m flashsloth.benchmark --size tiny

Sizes: `tiny` (a smoke test: the full token geometry with tiny widths), `small` (the full widths and vocabulary with
both depths cut by 8, so vision and language keep their full-size share of the cost) and `full` (SigLIP so400m +
Phi-2). torch and transformers are imported only when a benchmark runs, so that `flashsloth --help` stays instant.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from ..cli_errors import CliError


SIZES = ("tiny", "small", "full")
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


@dataclass
class BenchmarkSettings:
    size: str = "tiny"
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str = "auto"  # float32 on cpu, bfloat16 on cuda
    attn_implementation: str = "sdpa"
    compile: bool = False
    variants: tuple[str, ...] = VARIANTS
    tiled_peer: bool = False  # also time the SmolVLM-sized peer (base variant, batch 1)
    repeats: int = 3
    long_repeats: int = 1
    batch_repeats: int = 1
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    short_new_tokens: int = 8
    long_new_tokens: int = 128
    threads: int | None = None
    seed: int = 0
    profile_dir: str | None = None  # where to write a profile of one short answer per model (base variant)
    layout: PromptLayout = field(default_factory=PromptLayout)

    def validate(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}; got {self.size!r}.")
        if not self.variants or any(variant not in VARIANTS for variant in self.variants):
            raise ValueError(f"variants must be a non-empty subset of {', '.join(VARIANTS)}; got {self.variants}.")
        if self.repeats < 1 or self.long_repeats < 0 or self.batch_repeats < 1:
            raise ValueError("repeats and batch repeats must be at least 1, long repeats at least 0.")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive; got {self.batch_sizes}.")
        if self.short_new_tokens < 2 or (self.long_new_tokens and self.long_new_tokens <= self.short_new_tokens):
            raise ValueError(
                "short answers need at least 2 new tokens (one decoding step) and long answers more than short ones "
                f"(or 0 to skip them); got {self.short_new_tokens} and {self.long_new_tokens}."
            )


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
    peer.model.vision_tower = flashsloth.model.vision_tower
    peer.model.multi_modal_projector.linear_1 = flashsloth.model.multi_modal_projector.linear_1
    peer.model.multi_modal_projector.linear_2 = flashsloth.model.multi_modal_projector.linear_2
    peer.model.language_model = flashsloth.model.language_model
    peer.lm_head = flashsloth.lm_head
    left_on_meta = [name for name, tensor in [*peer.named_parameters(), *peer.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"The peer has modules not shared with FlashSloth: {left_on_meta[:5]}")
    return flashsloth.eval(), peer.eval()


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
        name: value.to(device, dtype) if value.is_floating_point() else value.to(device) for name, value in inputs.items()
    }


def kv_cache_bytes(text_config, sequence_length: int, dtype) -> int:
    """Keys and values of every decoder layer for one sequence: 2 * layers * kv_heads * head_dim * length * bytes."""
    import torch

    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * sequence_length * element_size


def cache_tensor_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers `Cache`."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def prefill_parts(model) -> dict:
    """The modules whose share of the prefill is reported: the vision tower, the decoder layers and the language
    modeling head, plus FlashSloth's SAP and EmbQ. Maps a part name to its modules."""
    inner = model.model
    # Llava and FlashSloth name their towers `vision_tower` and `language_model`, SmolVLM `vision_model` and `text_model`.
    vision_tower = getattr(inner, "vision_tower", None) or inner.vision_model
    language_model = getattr(inner, "language_model", None) or inner.text_model
    parts = {
        "vision": [vision_tower],
        "decoder": list(language_model.layers),
        "lm_head": [model.lm_head],
    }
    if hasattr(inner, "spatial_pooling"):
        parts.update(sap=[inner.spatial_pooling], embq=[inner.embedded_query])
    return parts


def operator_counter():
    """
    A context manager whose `count` is the number of aten operators run inside it that produce new data. On a GPU each
    is at least one kernel launch, so where launching dominates (eager code on a fast GPU) the prefill time follows
    this count, not the FLOPs. Views (reshapes, transposes, slices) launch nothing and are not counted.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    # `reshape` of a copy ends in `_unsafe_view`, which aten does not mark as a view but which moves no data either.
    metadata_only = {torch.ops.aten._unsafe_view.default}

    class OperatorCounter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not (func.is_view or func in metadata_only)
            return func(*args, **(kwargs or {}))

    return OperatorCounter()


def count_prefill_flops(model, inputs: dict):
    """
    FLOPs of one prefill forward pass (logits of the last position only, as `generate` asks), counted by torch's
    FLOP counter, in total and per part (see `prefill_parts`); the operators it dispatches; and the KV cache it fills.
    torch registers no formula for the CPU flash-attention kernel that sdpa uses on CPU; it gets the same formula as
    the GPU kernels.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    custom_mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    operators = operator_counter()
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter, operators:
        outputs = model(**inputs, use_cache=True, logits_to_keep=1)
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    module_names = {id(module): name for name, module in model.named_modules()}
    root = type(model).__name__
    part_flops = {
        part: sum(per_module.get(f"{root}.{module_names[id(module)]}", 0) for module in modules)
        for part, modules in prefill_parts(model).items()
    }
    # transformers >= 5.25 names the cache field of model outputs `cache`, earlier versions `past_key_values`.
    cache = next(outputs[name] for name in ("cache", "past_key_values") if name in outputs.keys())
    return counter.get_total_flops(), part_flops, operators.count, cache


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------


def _synchronize(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class TokenClock:
    """A `generate` streamer that records when each new token reaches the host (`generate` hands the prompt first)."""

    def __init__(self):
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


class PeakMemory:
    """
    Peak memory of a block above what was in use when it started: CUDA's max allocated, or on CPU the process's
    peak resident set (Linux: `VmHWM` after a reset through `/proc/self/clear_refs`, with freed heap memory handed
    back to the system first, so that it is not silently reused).
    """

    def __init__(self, device):
        import torch

        self.is_cuda = torch.device(device).type == "cuda"
        self.device = device
        self.extra_bytes = 0
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name and sys.platform.startswith("linux") else None

    @staticmethod
    def _status_kib(field_name: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise OSError(f"/proc/self/status has no {field_name}")

    def __enter__(self):
        import torch

        gc.collect()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current resident set
            self._before = self._status_kib("VmRSS") * 1024
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc_info):
        import torch

        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            self.extra_bytes = max(self._status_kib("VmHWM") * 1024 - self._before, 0)
        return False


def parameter_bytes(model) -> int:
    return sum(parameter.nbytes for parameter in model.parameters())


@dataclass
class RunRecord:
    """Arrival time of every new token (seconds from the call to `generate`) and the run's peak extra memory."""

    arrivals: list[float]
    peak_extra_bytes: int


def timed_generate(model, inputs: dict, new_tokens: int, generation_kwargs: dict, device) -> RunRecord:
    import torch

    clock = TokenClock()
    with PeakMemory(device) as memory, torch.inference_mode():
        _synchronize(device)
        start = time.perf_counter()
        output_ids = model.generate(**inputs, max_new_tokens=new_tokens, streamer=clock, **generation_kwargs)
        _synchronize(device)
    generated = output_ids.shape[1] - inputs["input_ids"].shape[1]
    if generated != new_tokens or len(clock.arrivals) != new_tokens:
        raise RuntimeError(f"Asked for {new_tokens} new tokens, generate returned {generated}: timings would be wrong.")
    return RunRecord([arrival - start for arrival in clock.arrivals], memory.extra_bytes)


def profile_generation(model, inputs: dict, new_tokens: int, generation_kwargs: dict, device, path_stem: str) -> dict:
    """
    One answer under torch's profiler. Writes `<path_stem>.trace.json` (a Chrome trace: chrome://tracing or Perfetto)
    and `<path_stem>.txt` (the operators that took the most time). Returns the answer's wall time and, on a GPU, the
    time kernels and copies kept the device busy: far below the wall time, the host launching work is the limit.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        run = timed_generate(model, inputs, new_tokens, generation_kwargs, device)
    profiler.export_chrome_trace(f"{path_stem}.trace.json")
    operators = profiler.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    with open(f"{path_stem}.txt", "w") as file:
        file.write(operators.table(sort_by=sort_by, row_limit=40))
    summary = {"wall_s": run.arrivals[-1], "trace": f"{path_stem}.trace.json", "table": f"{path_stem}.txt"}
    if on_gpu:
        summary["device_busy_s"] = sum(operator.self_device_time_total for operator in operators) / 1e6
    return summary


def time_prefill_parts(model, inputs: dict, repeats: int, device) -> dict[str, float]:
    """
    Median seconds of a prefill forward pass and of its parts (see `prefill_parts`), timed by module hooks in a pass of
    their own (the hooks synchronize the device). For FlashSloth also the query-block layout EmbQ reads, timed alone.
    """
    import torch

    from ..modeling_flashsloth import build_query_block_layout

    parts = prefill_parts(model)
    spent = dict.fromkeys(parts, 0.0)
    started = {}

    def timing_hooks(part):
        def before(module, args):
            _synchronize(device)
            started[part] = time.perf_counter()

        def after(module, args, output):
            _synchronize(device)
            spent[part] += time.perf_counter() - started[part]

        return before, after

    handles = []
    for part, modules in parts.items():
        before, after = timing_hooks(part)
        for module in modules:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    samples = {name: [] for name in ("prefill", *parts)}
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                spent.update(dict.fromkeys(parts, 0.0))
                _synchronize(device)
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _synchronize(device)
                samples["prefill"].append(time.perf_counter() - start)
                for part in parts:
                    samples[part].append(spent[part])
                if "instruction_mask" in inputs:
                    start = time.perf_counter()
                    build_query_block_layout(
                        inputs["input_ids"], inputs["instruction_mask"], inputs["image_num_crops"], model.config
                    )
                    _synchronize(device)
                    samples.setdefault("layout", []).append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def resolve_device_and_dtype(settings: BenchmarkSettings):
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu.")
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


def generation_kwargs(config, settings: BenchmarkSettings, device) -> dict:
    """The same greedy settings for every model: exactly the asked number of tokens, placeholders never generated.
    `config` is the config of the model that generates."""
    from transformers import CompileConfig

    placeholder_ids = [config.image_token_id, getattr(config, "query_token_id", None)]
    kwargs = {
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": config.text_config.pad_token_id or 0,
        "suppress_tokens": [token_id for token_id in placeholder_ids if token_id is not None],
    }
    if settings.compile:
        import torch

        mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
        compile_config = CompileConfig(mode=mode)
        compile_config._compile_all_devices = True  # generate() compiles on its own only on accelerators
        # A prefill chunk at least as long as any prompt: generate() then runs the whole prefill through the compiled
        # forward too (on a static cache it initialises ahead of the trace), one graph per prompt shape.
        kwargs.update(
            cache_implementation="static",
            compile_config=compile_config,
            prefill_chunk_size=config.text_config.max_position_embeddings,
        )
    return kwargs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_description(device) -> dict:
    import torch
    import transformers

    description = {
        "platform": platform.platform(),
        "cpu": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.device(device).type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """
    Run the whole benchmark and return its results as a JSON-ready dict (see `format_markdown`):

    1. per model and variant, one prefill under torch's FLOP counter (it also warms the prefill up), then one untimed
       short answer (with `compile`, one generation of every shape to be timed, so that compilation stays out of the
       timings);
    2. the prefill split into its parts (vision tower, decoder layers, head; FlashSloth's SAP and EmbQ), timed by
       module hooks: `repeats` times for FlashSloth, once for the peer;
    3. short answers at batch 1, `repeats` rounds over all models and variants, interleaved: time to first token,
       response time, decode speed;
    4. long answers at batch 1 (base variant), `long_repeats` rounds: response time and decode speed;
    5. short answers at every batch size above 1 (base variant), `batch_repeats` rounds: throughput.

    The SmolVLM-sized peer (`tiled_peer`) runs in one variant only, base unless HD runs alone (its tiling does not depend
    on the image size), and at batch 1 only (17 tiles per image make large batches slow on a CPU).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device, dtype = resolve_device_and_dtype(settings)
    if settings.size == "full" and torch.device(device).type == "cpu":
        logger.warning("The full-size models on CPU take minutes per prefill; `--size small` keeps the proportions.")

    started = time.perf_counter()
    flashsloth, peer = build_models(settings.size, dtype, device, settings.attn_implementation, settings.seed)
    models = {"flashsloth": flashsloth, "peer": peer}
    if settings.tiled_peer:
        models[TILED_PEER] = build_tiled_peer(settings.size, dtype, device, settings.attn_implementation, settings.seed)
    config = flashsloth.config
    gen_kwargs = {name: generation_kwargs(model.config, settings, device) for name, model in models.items()}
    short, long = settings.short_new_tokens, settings.long_new_tokens
    main_variant = "base" if "base" in settings.variants else settings.variants[0]
    cases = [(variant, name) for variant in settings.variants for name in MODEL_NAMES]
    if settings.tiled_peer:
        cases.insert(cases.index((main_variant, "peer")) + 1, (main_variant, TILED_PEER))
    main_cases = [(variant, name) for variant, name in cases if variant == main_variant]
    batched_cases = [(main_variant, name) for name in MODEL_NAMES]
    batch_sizes = sorted(batch for batch in set(settings.batch_sizes) if batch > 1)

    inputs_cache = {}

    def inputs_for(variant: str, name: str, batch_size: int = 1) -> dict:
        key = (variant, name, batch_size)
        if key not in inputs_cache:
            layout, seed = settings.layout, settings.seed
            if name == TILED_PEER:
                built = build_tiled_peer_inputs(models[name].config, batch_size, layout, seed=seed)
            else:
                built = build_inputs(config, name, VARIANT_CROPS[variant], batch_size, layout, seed=seed)
            inputs_cache[key] = move_inputs(built, device, dtype)
        return inputs_cache[key]

    # What runs, in order: (phase, variant, model, batch size, new tokens).
    timed = [("short", variant, name, 1, short) for variant, name in _interleaved(cases, settings.repeats)]
    if long:
        timed += [("long", variant, name, 1, long) for variant, name in _interleaved(main_cases, settings.long_repeats)]
    for batch_size in batch_sizes:
        timed += [
            ("batch", variant, name, batch_size, short)
            for variant, name in _interleaved(batched_cases, settings.batch_repeats)
        ]
    # Untimed generations first: the first call of a shape pays one-time costs (compilation; on a GPU also library
    # set-up, 5x a warm eager call). Compiled, every shape; eager, one batch-1 short answer per case.
    if settings.compile:
        warmups = sorted({run[1:] for run in timed}, key=str)
    else:
        warmups = [(variant, name, 1, short) for variant, name in cases]
    profiled = main_cases if settings.profile_dir else []
    progress = tqdm(
        total=2 * len(cases) + len(warmups) + len(timed) + len(profiled), desc=f"bench {settings.size}"
    )

    results = {variant: {} for variant in settings.variants}
    for variant, name in cases:
        inputs = inputs_for(variant, name)
        flops, part_flops, operators, cache = count_prefill_flops(models[name], inputs)
        length = inputs["input_ids"].shape[1]
        # The uncompressed peer's geometry is FlashSloth's, read from FlashSloth's config; the tiled peer has its own.
        model_config = models[name].config if name == TILED_PEER else config
        results[variant][name] = dict(
            visual_tokens=visual_tokens(model_config, name, VARIANT_CROPS[variant]),
            prompt_tokens=length,
            prefill_flops=flops,
            prefill_operators=operators,
            prefill_flops_by_part=part_flops,
            kv_cache_bytes=kv_cache_bytes(model_config.text_config, length, dtype),
            kv_cache_bytes_measured=cache_tensor_bytes(cache),
            weight_bytes=parameter_bytes(models[name]),
        )
        del cache
        progress.update()
    for variant, name, batch_size, new_tokens in warmups:
        timed_generate(models[name], inputs_for(variant, name, batch_size), new_tokens, gen_kwargs[name], device)
        progress.update()
    for variant, name in cases:
        # FlashSloth's parts give a goal (SAP + EmbQ share), the peers' only explain their prefills: timed once.
        repeats = settings.repeats if name == "flashsloth" else 1
        entry = results[variant][name]
        entry["prefill_parts_s"] = time_prefill_parts(models[name], inputs_for(variant, name), repeats, device)
        entry["prefill_gflops_per_s"] = {
            part: flops / entry["prefill_parts_s"][part] / 1e9
            for part, flops in entry["prefill_flops_by_part"].items()
            if entry["prefill_parts_s"][part] > 0
        }
        progress.update()

    records = {}
    for phase, variant, name, batch_size, new_tokens in timed:
        run = timed_generate(models[name], inputs_for(variant, name, batch_size), new_tokens, gen_kwargs[name], device)
        records.setdefault((phase, variant, name, batch_size), []).append(run)
        progress.update()
    profiles = {}
    for variant, name in profiled:
        path_stem = os.path.join(settings.profile_dir, f"{settings.size}_{variant}_{name}")
        inputs = inputs_for(variant, name)
        profiles[name] = profile_generation(models[name], inputs, short, gen_kwargs[name], device, path_stem)
        progress.update()
    progress.close()

    for variant, name in cases:
        results[variant][name].update(
            summarize_runs(
                records.get(("short", variant, name, 1), []),
                records.get(("long", variant, name, 1), []),
                {batch: records.get(("batch", variant, name, batch), []) for batch in batch_sizes},
                short,
                long,
                include_batch_one=1 in settings.batch_sizes,
            )
        )
        entry = results[variant][name]
        entry["peak_memory_bytes"] = entry["weight_bytes"] + entry.pop("peak_extra_bytes")
        entry["peak_memory_bytes_by_batch"] = {
            batch: entry["weight_bytes"] + extra for batch, extra in entry.pop("peak_extra_bytes_by_batch").items()
        }
    for variant in settings.variants:
        for peer_name in peers_in(results[variant]):
            results[variant][ADVANTAGE_KEYS[peer_name]] = compute_advantages(results[variant], short, long, peer_name)

    report = {
        "size": settings.size,
        "size_description": SIZE_SPECS[settings.size].description,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": settings.attn_implementation,
        "compile": settings.compile,
        "settings": {
            key: value for key, value in asdict(settings).items() if key not in ("size", "device", "dtype", "compile")
        },
        "machine": _machine_description(device),
        "duration_s": time.perf_counter() - started,
        "variants": results,
    }
    if profiles:
        report["profile"] = {"variant": main_variant, "new_tokens": short, "models": profiles}
    report["goals"] = evaluate_goals(report)
    logger.info("Benchmark of size %s done.", settings.size)
    return report


def _interleaved(cases: list, rounds: int) -> list:
    """Every case once per round, every other round in reverse order, so that drifts in machine load cancel out."""
    return [case for round_index in range(rounds) for case in (cases if round_index % 2 == 0 else cases[::-1])]


def summarize_runs(
    short_runs: list, long_runs: list, batch_runs: dict, short: int, long: int, include_batch_one: bool = True
) -> dict:
    """Medians of one model's runs: time to first token, response times, decode speed, throughput, peak memory."""
    summary = {
        "ttft_s": _median([run.arrivals[0] for run in short_runs]),
        f"response_{short}_s": _median([run.arrivals[-1] for run in short_runs]),
    }
    decode_runs = long_runs or short_runs
    summary["decode_ms_per_token"] = _median(
        [1000 * (run.arrivals[-1] - run.arrivals[0]) / (len(run.arrivals) - 1) for run in decode_runs]
    )
    if long and long_runs:
        summary[f"response_{long}_s"] = _median([run.arrivals[-1] for run in long_runs])
    throughput = {"1": short / summary[f"response_{short}_s"]} if include_batch_one else {}
    for batch_size, runs in batch_runs.items():
        if runs:
            throughput[str(batch_size)] = batch_size * short / _median([run.arrivals[-1] for run in runs])
    summary["throughput_tokens_per_s"] = throughput
    summary["peak_extra_bytes"] = max(run.peak_extra_bytes for run in short_runs + long_runs)
    summary["peak_extra_bytes_by_batch"] = {
        str(batch_size): max(run.peak_extra_bytes for run in runs) for batch_size, runs in batch_runs.items() if runs
    }
    summary["samples_s"] = {
        "ttft": [run.arrivals[0] for run in short_runs],
        f"response_{short}": [run.arrivals[-1] for run in short_runs],
        f"response_{long}": [run.arrivals[-1] for run in long_runs],
        **{f"batch_{batch}_response_{short}": [run.arrivals[-1] for run in runs] for batch, runs in batch_runs.items() if runs},
    }
    return summary


def peers_in(variant_results: dict) -> list[str]:
    """The peers measured in one variant: the uncompressed peer, and the SmolVLM-sized one where it ran."""
    return [name for name in ("peer", TILED_PEER) if name in variant_results]


def compute_advantages(variant_results: dict, short: int, long: int, peer_name: str = "peer") -> dict:
    """How many times better FlashSloth is than a peer on each metric (peer / FlashSloth, or FlashSloth / peer for
    throughput)."""
    ours, peer = variant_results["flashsloth"], variant_results[peer_name]
    advantage = {}
    for key in (
        "visual_tokens",
        "prompt_tokens",
        "prefill_flops",
        "prefill_operators",
        "kv_cache_bytes",
        "ttft_s",
        "decode_ms_per_token",
    ):
        advantage[key] = peer[key] / ours[key]
    for key in (f"response_{short}_s", f"response_{long}_s", "peak_memory_bytes"):
        if key in ours:
            advantage[key] = peer[key] / ours[key]
    advantage["throughput_tokens_per_s"] = {
        batch: ours["throughput_tokens_per_s"][batch] / peer["throughput_tokens_per_s"][batch]
        for batch in ours["throughput_tokens_per_s"]
        if batch in peer["throughput_tokens_per_s"]
    }
    return advantage


def sap_embq_share(parts: dict) -> float:
    """FlashSloth's own prefill work (SAP, EmbQ and the layout EmbQ reads) as a share of its prefill time."""
    return (parts["sap"] + parts["embq"] + parts["layout"]) / parts["prefill"]


@dataclass
class Goal:
    name: str
    measured: float
    target: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target


def evaluate_goals(report: dict) -> list[dict]:
    """The acceptance goals of the speed issue, on what this run measured."""
    goals = []
    variants = report["variants"]
    for variant, results in variants.items():
        advantage = results["advantage"]
        goals.append(
            Goal(f"{variant}: TTFT ratio / counted-FLOP ratio", advantage["ttft_s"] / advantage["prefill_flops"], 0.9)
        )
    for variant, results in variants.items():
        share = sap_embq_share(results["flashsloth"]["prefill_parts_s"])
        goals.append(Goal(f"{variant}: SAP + EmbQ share of FlashSloth's prefill", share, 0.05, higher_is_better=False))
    for variant, results in variants.items():
        goals.append(
            Goal(f"{variant}: decode ms/token, peer / FlashSloth", results["advantage"]["decode_ms_per_token"], 1.0)
        )
    if "base" in variants:
        goals.append(Goal("base: KV-cache bytes per sequence, peer / FlashSloth", variants["base"]["advantage"]["kv_cache_bytes"], 5.0))
        throughput = variants["base"]["advantage"]["throughput_tokens_per_s"]
        largest = max(throughput, key=int, default="1")
        if int(largest) > 1:  # the goal is about batching: a run at batch 1 only has none
            goals.append(Goal(f"base: throughput at batch {largest}, FlashSloth / peer", throughput[largest], 2.0))
    if report["size"] == "full" and report["device"].startswith("cuda") and "base" in variants:
        ours, advantage = variants["base"]["flashsloth"], variants["base"]["advantage"]
        short = report["settings"]["short_new_tokens"]
        goals += [
            Goal(f"base: response ratio, {short} new tokens", advantage[f"response_{short}_s"], 2.4),
            Goal("base: decode tokens/s at batch 1", 1000 / ours["decode_ms_per_token"], 300.0),
            Goal("base: TTFT ms", 1000 * ours["ttft_s"], 15.0, higher_is_better=False),
            Goal("base: peak memory GB", ours["peak_memory_bytes"] / 1e9, 8.0, higher_is_better=False),
        ]
    return [{**asdict(goal), "met": goal.met} for goal in goals]


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------


def _format_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{1000 * seconds:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _format_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.2f} {unit}"
    return f"{count:,.0f} B"


def _format_ratio(value: float | None) -> str:
    return "–" if value is None else f"**{value:.2f}x**"


def _lookup(record: dict, path: tuple[str, ...]):
    """`record[path[0]][path[1]]...`, or None where a key is missing."""
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def table_rows(report: dict) -> list[tuple[str, list[str]]]:
    """
    The rows of the markdown table: a label, then per variant FlashSloth's value and, for each peer that ran in that
    variant, the peer's value and a comparison: FlashSloth's advantage as computed (`advantage`), the peer's value over
    FlashSloth's (`peer / ours`), FlashSloth's over the peer's (`ours / peer`), or nothing.
    """
    settings = report["settings"]
    short, long = settings["short_new_tokens"], settings["long_new_tokens"]
    variants = report["variants"]
    batches = sorted(
        {int(batch) for results in variants.values() for batch in results["flashsloth"]["throughput_tokens_per_s"]}
    )

    def comparison(results: dict, peer: str, path: tuple[str, ...], kind: str | None) -> str:
        ours, theirs = _lookup(results["flashsloth"], path), _lookup(results[peer], path)
        if kind == "advantage":
            return _format_ratio(_lookup(results[ADVANTAGE_KEYS[peer]], path))
        if kind is None or ours is None or theirs is None:
            return "" if kind is None else "–"
        return _format_ratio(theirs / ours) if kind == "peer / ours" else f"{ours / theirs:.2f}x"

    def row(path: tuple[str, ...], format_value, kind: str | None = "advantage") -> list[str]:
        cells = []
        for results in variants.values():
            for name in ("flashsloth", *peers_in(results)):
                value = _lookup(results[name], path)
                cells.append("–" if value is None else format_value(value))
                if name != "flashsloth":
                    cells.append(comparison(results, name, path, kind))
        return cells

    rows = [
        ("visual tokens per image", row(("visual_tokens",), "{:,}".format)),
        ("prompt tokens", row(("prompt_tokens",), "{:,}".format)),
        ("prefill GFLOPs (counted)", row(("prefill_flops",), lambda value: f"{value / 1e9:,.1f}")),
        ("prefill operators (non-view aten ops)", row(("prefill_operators",), "{:,}".format)),
        ("time to first token", row(("ttft_s",), _format_ms)),
        ("decode per token", row(("decode_ms_per_token",), "{:,.1f} ms".format)),
        (f"response, {short} new tokens", row((f"response_{short}_s",), _format_ms)),
    ]
    if long:
        rows.append((f"response, {long} new tokens", row((f"response_{long}_s",), _format_ms)))
    rows += [
        ("KV cache per sequence (prompt)", row(("kv_cache_bytes",), _format_bytes)),
        ("peak memory, batch 1 (weights + run)", row(("peak_memory_bytes",), _format_bytes)),
    ]
    for batch in batches:
        label = f"throughput, batch {batch} (tokens/s, {short} new)"
        rows.append((label, row(("throughput_tokens_per_s", str(batch)), "{:,.2f}".format)))
    for batch in (batch for batch in batches if batch > 1):
        memory = row(("peak_memory_bytes_by_batch", str(batch)), _format_bytes, "peer / ours")
        rows.append((f"peak memory, batch {batch}", memory))
    for part, label in (("vision", "vision tower"), ("decoder", "decoder layers")):
        rows.append((f"prefill GFLOP/s, {label}", row(("prefill_gflops_per_s", part), "{:,.1f}".format, "ours / peer")))
    shares = []
    for results in variants.values():
        share = sap_embq_share(results["flashsloth"]["prefill_parts_s"])
        shares += [f"{100 * share:.2f}%"] + ["", ""] * len(peers_in(results))
    rows.append(("SAP + EmbQ share of prefill", shares))
    return rows


def format_markdown(report: dict) -> str:
    machine = report["machine"]
    hardware = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores, torch threads: {machine['torch_threads']})"
    lines = [
        f"Size `{report['size']}` ({report['size_description']}); {report['device']}, {report['dtype']}, "
        f"{report['attn_implementation']}{', static cache + torch.compile' if report['compile'] else ''}; "
        f"{hardware}; torch {machine['torch']}, transformers {machine['transformers']}. Medians of "
        f"{report['settings']['repeats']} interleaved runs (long answers {report['settings']['long_repeats']}, "
        f"batches {report['settings']['batch_repeats']}); advantage = how many times better FlashSloth is.",
        "",
    ]
    header, separator = ["metric"], ["---"]
    for variant, results in report["variants"].items():
        crops = VARIANT_CROPS[variant]
        header.append("FlashSloth HD" if variant == "hd" else "FlashSloth")
        tiles = SMOLVLM_TILE_GRID**2 + 1
        peer_headers = {"peer": f"peer ({crops} x 729)", TILED_PEER: f"SmolVLM-sized ({tiles} tiles)"}
        for peer in peers_in(results):
            header += [peer_headers[peer], "advantage"]
        separator += ["---:"] * (1 + 2 * len(peers_in(results)))
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(separator) + "|"]
    for label, cells in table_rows(report):
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|:---:|"]
    for goal in report["goals"]:
        comparison = ">=" if goal["higher_is_better"] else "<="
        verdict = "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['name']} | {goal['measured']:.3f} | {comparison} {goal['target']:g} | {verdict} |")
    if "profile" in report:
        profile = report["profile"]
        lines += ["", f"Profiled: one {profile['new_tokens']}-token answer per model ({profile['variant']}).", ""]
        for name, summary in profile["models"].items():
            busy = ""
            if "device_busy_s" in summary:
                share = summary["device_busy_s"] / summary["wall_s"]
                busy = f"; device busy {_format_ms(summary['device_busy_s'])} ({share:.0%})"
            lines.append(f"- {name}: {_format_ms(summary['wall_s'])}{busy}; `{summary['table']}`, `{summary['trace']}`")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str):
    """A PNG like the paper's speed chart: time to first token and response times per model, throughput per batch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    settings = report["settings"]
    short, long = settings["short_new_tokens"], settings["long_new_tokens"]
    variants = report["variants"]
    colors = {"flashsloth": "#2a9d8f", "peer": "#b0b0b0", TILED_PEER: "#e9c46a"}
    figure, axes = pyplot.subplots(1, 3, figsize=(15, 4.5))

    # Left: per variant and metric a group of bars, FlashSloth's and each peer's, FlashSloth's advantage above a peer's.
    metrics = [("ttft_s", "TTFT"), (f"response_{short}_s", f"{short} tok")]
    if long:
        metrics.append((f"response_{long}_s", f"{long} tok"))
    groups = [
        (variant, key, label)
        for variant in variants
        for key, label in metrics
        if all(key in variants[variant][name] for name in MODEL_NAMES)
    ]
    labelled = set()
    for index, (variant, key, _) in enumerate(groups):
        names = ["flashsloth", *(peer for peer in peers_in(variants[variant]) if key in variants[variant][peer])]
        width = 0.8 / len(names)
        for position, name in enumerate(names):
            value = variants[variant][name][key]
            x = index - 0.4 + width * (position + 0.5)
            label = None if name in labelled else MODEL_LABELS[name]
            labelled.add(name)
            axes[0].bar(x, value, width, color=colors[name], label=label)
            if name != "flashsloth":
                advantage = variants[variant][ADVANTAGE_KEYS[name]][key]
                axes[0].annotate(f"{advantage:.1f}x", (x, value), ha="center", va="bottom", fontsize=8)
    axes[0].set_xticks(range(len(groups)), [f"{variant}\n{label}" for variant, _, label in groups], fontsize=8)
    axes[0].set_ylabel("seconds (batch 1)")
    axes[0].set_title("time to first token and response time")
    axes[0].set_ylim(top=1.35 * axes[0].get_ylim()[1])  # room for the legend above the bars
    axes[0].legend(fontsize=8, loc="upper right")

    names = [(variant, name) for variant in variants for name in ("flashsloth", *peers_in(variants[variant]))]
    axes[1].barh(
        [f"{MODEL_LABELS[name]} ({variant})" for variant, name in names],
        [variants[variant][name]["prefill_flops"] / 1e9 for variant, name in names],
        color=[colors[name] for _, name in names],
    )
    axes[1].set_xlabel("prefill GFLOPs (counted)")
    axes[1].set_title("prefill compute")

    for name in MODEL_NAMES:
        for variant in variants:
            throughput = variants[variant][name]["throughput_tokens_per_s"]
            if len(throughput) > 1:
                batches = sorted(throughput, key=int)
                axes[2].plot(
                    [int(batch) for batch in batches],
                    [throughput[batch] for batch in batches],
                    marker="o",
                    color=colors[name],
                    label=f"{MODEL_LABELS[name]} ({variant})",
                )
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks(sorted({int(batch) for line in variants.values() for batch in line["flashsloth"]["throughput_tokens_per_s"]}))
    axes[2].get_xaxis().set_major_formatter(ticker.ScalarFormatter())
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("batch size")
    axes[2].set_ylabel(f"generated tokens/s ({short} new tokens)")
    axes[2].set_title("throughput")
    if axes[2].lines:
        axes[2].legend()
    peers = "peers" if any(TILED_PEER in results for results in variants.values()) else "an uncompressed peer"
    figure.suptitle(f"FlashSloth vs {peers}: size {report['size']}, {report['device']}, {report['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny: smoke test (full token geometry, tiny widths); small: full widths and vocabulary, depths cut by 8 "
        "(CPU, minutes); full: SigLIP so400m + Phi-2 (GPU, or CPU slowly) (default: %(default)s).",
    )
    parser.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Weights and activations dtype; auto is float32 on CPU, bfloat16 on CUDA (default: %(default)s).",
    )
    parser.add_argument(
        "--attn",
        choices=ATTENTION_CHOICES,
        default="sdpa",
        help="Attention implementation of both models (default: %(default)s).",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Generate with a static KV cache and a torch.compile'd forward for the prefill and the decoding steps (CUDA "
        "graphs on a GPU; every shape is compiled before timing).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="base: one 384x384 crop per image (81+9 tokens vs 729); hd: 5 crops (405+9 vs 3645) (default: both).",
    )
    parser.add_argument(
        "--smolvlm",
        action="store_true",
        help="Also time a SmolVLM-sized native peer (transformers' SmolVLM: SigLIP so400m tiles, SmolLM2-1.7B) at its "
        "processor's default tiling, 4x4 tiles + the whole image = 1377 tokens; base variant (HD when it runs alone), "
        "batch 1, no goals.",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="Timed runs per model for time to first token, short answers and FlashSloth's SAP/EmbQ share (default: %(default)s).",
    )
    parser.add_argument(
        "--long-repeats",
        type=_non_negative_int,
        default=1,
        help="Timed long answers per model, at batch 1; they also give decode ms/token (default: %(default)s).",
    )
    parser.add_argument(
        "--batch-repeats",
        type=_positive_int,
        default=1,
        help="Timed runs per model at each batch size above 1 (default: %(default)s).",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=_positive_int,
        default=[1, 8, 32],
        help="Batch sizes of the throughput measurement, short answers, base variant (default: 1 8 32).",
    )
    parser.add_argument(
        "--short-new-tokens", type=_positive_int, default=8, help="Tokens of a short answer, the VQA case (default: %(default)s)."
    )
    parser.add_argument(
        "--long-new-tokens",
        type=_non_negative_int,
        default=128,
        help="Tokens of a long answer; 0 skips long answers (default: %(default)s).",
    )
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs (default: %(default)s).")
    parser.add_argument("--json", metavar="PATH", help="Write the full results (every sample, every ratio) as JSON.")
    parser.add_argument("--markdown", metavar="PATH", help="Write the markdown table (it is printed in any case).")
    parser.add_argument("--plot", metavar="PATH", help="Write a PNG chart (needs matplotlib: the `plot` extra).")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="After timing, profile one short answer per model (base variant) with torch's profiler: a Chrome trace and "
        "an operator table per model in DIR, and on a GPU how busy the device was.",
    )
    parser.set_defaults(handler=run_bench)
    return parser


BENCH_DESCRIPTION = (
    "Time FlashSloth against an uncompressed peer (transformers' Llava with the same SigLIP, projector and Phi, all "
    "729 patch tokens per crop): counted prefill FLOPs, time to first token, decode speed, short and long response "
    "times, throughput per batch size, KV-cache size and peak memory; optionally also against a SmolVLM-sized peer. "
    "Random weights; prints a markdown table."
)


def add_commands(subparsers):
    """Add `flashsloth bench`."""
    parser = subparsers.add_parser("bench", help="Speed benchmark against an uncompressed peer.", description=BENCH_DESCRIPTION)
    configure_parser(parser)


def _settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn,
        compile=args.compile,
        variants=tuple(dict.fromkeys(args.variants)),
        tiled_peer=args.smolvlm,
        repeats=args.repeats,
        long_repeats=args.long_repeats,
        batch_repeats=args.batch_repeats,
        batch_sizes=tuple(args.batch_sizes),
        short_new_tokens=args.short_new_tokens,
        long_new_tokens=args.long_new_tokens,
        threads=args.threads,
        seed=args.seed,
        profile_dir=args.profile,
    )


def run_bench(args: argparse.Namespace) -> None:
    settings = _settings_from_args(args)
    try:
        settings.validate()
    except ValueError as error:
        raise CliError(str(error)) from error
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as error:
            raise CliError("--plot needs matplotlib: pip install 'flashsloth[plot]' (or matplotlib)") from error
    for path in (args.json, args.markdown, args.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CliError(f"the folder of {path} does not exist")
    if args.profile and not os.path.isdir(args.profile):
        raise CliError(f"--profile {args.profile}: no such folder; create it first")
    try:
        report = run_benchmark(settings)
    except (ValueError, ImportError) as error:
        raise CliError(str(error).splitlines()[0]) from error
    markdown = format_markdown(report)
    sys.stdout.write(markdown)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(markdown)
    if args.plot:
        plot_report(report, args.plot)


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="python -m flashsloth.benchmark", description=BENCH_DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except CliError as error:
        print(f"flashsloth bench: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
