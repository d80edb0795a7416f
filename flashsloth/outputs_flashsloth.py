"""
What FlashSloth's forward passes return and how they collect it: the output classes, the hidden-state selection, the
attention-weight recording, and the eager attention (float32 scores under float16) whose weights they return.
"""

import collections
import inspect
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import AttentionInterface
from transformers.utils import output_capturing
from transformers.utils.deprecation import deprecate_kwarg


# transformers 5.25 renamed the cache argument of its decoder layers, masking functions and `generate` from
# `past_key_values` to `cache` (the old name warns until 5.40), and so the cache field of model outputs, which `generate`
# reads back. FlashSloth takes either argument, and passes on and returns the cache under the installed name.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def renamed_cache_argument(forward: Callable) -> Callable:
    """On transformers >= 5.25, `past_key_values=` warns that it is deprecated (as native models do) and is passed on
    as `cache=`."""
    if CACHE_ARGUMENT == "past_key_values":
        return forward
    return deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache")(forward)


@dataclass
class FlashSlothImageFeatures(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(num_crops, num_patches, vision_hidden_size)`):
        Encoder output at `vision_feature_layer`, before pooling: what EmbQ reads.
    pooler_output (`tuple(torch.FloatTensor)`, one `(crops * image_tokens_per_crop, text_hidden_size)` per image):
        The image tokens of each image as they enter the language model (`image_embeds`, split by image).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The vision tower's hidden states (embeddings, then each encoder layer that is built).
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` on eager attention):
        The vision tower's attention weights, one `(num_crops, heads, num_patches, num_patches)` per layer.
    pooling_weights (`torch.FloatTensor` of shape `(num_crops, num_windows, window_size**2)`):
        SAP softmax weights over the patches of each window.
    image_embeds (`torch.FloatTensor` of shape `(num_crops, num_windows, text_hidden_size)`):
        Pooled and projected image tokens per crop.
    """

    pooling_weights: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


MULTIMODAL_OUTPUT_DOC = r"""
    image_hidden_states (`torch.FloatTensor` of shape `(num_crops, num_windows, hidden_size)`, *optional*):
        The projected image tokens of this forward pass (`image_outputs.image_embeds`).
    image_outputs (`FlashSlothImageFeatures`, *optional*):
        What `get_image_features` returned for the images of this pass, the vision tower's attention weights and
        hidden states included when asked.
    query_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` on eager):
        EmbQ's two attention maps: each query token over its instruction text, `(num_blocks, heads, num_query_tokens,
        max_text_length)`, then over the un-pooled patches of the images before it, `(num_blocks, heads,
        num_query_tokens, max_image_rows)`; keys in the order of `build_query_layout`'s `text_positions` and
        `image_rows`, padded keys at weight 0.
"""


@dataclass
class FlashSlothModelOutputWithPast(ModelOutput):
    r"""
    cache (`Cache`, *optional*):
        The language model's key/value cache, named `past_key_values` before transformers 5.25.
    """

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_ARGUMENT == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: FlashSlothImageFeatures | None = None
    query_attentions: tuple[torch.FloatTensor, torch.FloatTensor] | None = None


@dataclass
class FlashSlothCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Next-token prediction loss over the labelled positions.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Prediction scores of the language modeling head.
    cache (`Cache`, *optional*):
        The language model's key/value cache, named `past_key_values` before transformers 5.25.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_ARGUMENT == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: FlashSlothImageFeatures | None = None
    query_attentions: tuple[torch.FloatTensor, torch.FloatTensor] | None = None


FlashSlothModelOutputWithPast.__doc__ += MULTIMODAL_OUTPUT_DOC
FlashSlothCausalLMOutputWithPast.__doc__ += MULTIMODAL_OUTPUT_DOC


# From transformers 5.25 on, hidden-state indices count the embeddings (index 0) and the layer outputs; before, only
# the layer outputs, and a selection returns no embeddings. FlashSloth reads them as the installed version does.
INDICES_COUNT_EMBEDDINGS = hasattr(output_capturing, "resolve_hidden_states_indices")


def selected_hidden_states(output_hidden_states: bool | int | list[int] | None, count: int) -> tuple[set | None, bool]:
    """
    The hidden states (of `count`: the embeddings, then each layer's output) that `output_hidden_states` asks for:
    all for `True`, none for `False`/`None`, else the given index or indices (negative ones count from the end), as
    transformers' output capturing reads them. Also whether the embeddings are left out of the returned tuple.
    """
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return (set(range(count)) if output_hidden_states else None), False
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
    if INDICES_COUNT_EMBEDDINGS:
        return {index % count for index in indices if -count <= index < count}, False
    return {index % (count - 1) + 1 for index in indices if -count < index < count - 1}, True


@contextmanager
def recorded_attention_weights(modules: list[nn.Module], enabled: bool):
    """Collect the attention weights (second output) of `modules` while the block runs; nothing when not `enabled` or
    when the attention implementation returns none (only eager does)."""
    weights = []

    def record(module, args, output):
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            weights.append(output[1])

    handles = [module.register_forward_hook(record) for module in modules] if enabled else []
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Eager attention (transformers' formula, with grouped key/value heads repeated) that computes the query-key scores
    in float32 when the inputs are float16: Phi-2's products overflow float16 (inf, then NaN after the softmax), which
    is why the original Phi-2 code upcast them too. Other dtypes run exactly transformers' eager operations.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    score_dtype = torch.float32 if query.dtype == torch.float16 else query.dtype
    attn_weights = torch.matmul(query.to(score_dtype), key.to(score_dtype).transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


# transformers picks a decoder's eager attention by the name "eager", so FlashSloth's eager function is registered under
# an internal name that the decoder's config names only while a float16 pass runs on "eager" (`float32_eager_scores`):
# configs read "eager" at all other times.
FLOAT32_SCORES_EAGER = "flashsloth_float32_scores_eager"  # not "flash_...": transformers would take it for flash-attn
AttentionInterface.register(FLOAT32_SCORES_EAGER, eager_attention_forward)
_EAGER_SWITCH_LOCK = threading.Lock()
_EAGER_SWITCH_PASSES = collections.Counter()  # float16 eager passes running, per decoder config


@contextmanager
def float32_eager_scores(config, dtype: torch.dtype):
    """
    Within this block a float16 decoder on "eager" attention (`config`) computes its query-key scores in float32
    (`eager_attention_forward`) instead of overflowing; other dtypes and implementations are left alone, and so is a
    compiled pass. Passes running at once in several threads are counted: the last one restores "eager".
    """
    active = (
        dtype == torch.float16
        and config._attn_implementation in ("eager", FLOAT32_SCORES_EAGER)
        and not torch.compiler.is_compiling()
    )
    if active:
        with _EAGER_SWITCH_LOCK:
            _EAGER_SWITCH_PASSES[id(config)] += 1
            config._attn_implementation_internal = FLOAT32_SCORES_EAGER
    try:
        yield
    finally:
        if active:
            with _EAGER_SWITCH_LOCK:
                _EAGER_SWITCH_PASSES[id(config)] -= 1
                if _EAGER_SWITCH_PASSES[id(config)] <= 0:
                    del _EAGER_SWITCH_PASSES[id(config)]
                    if config._attn_implementation_internal == FLOAT32_SCORES_EAGER:
                        config._attn_implementation_internal = "eager"


__all__ = [
    "CACHE_ARGUMENT",
    "FlashSlothCausalLMOutputWithPast",
    "FlashSlothImageFeatures",
    "FlashSlothModelOutputWithPast",
    "eager_attention_forward",
    "float32_eager_scores",
    "recorded_attention_weights",
    "renamed_cache_argument",
    "selected_hidden_states",
]
