"""What the benchmark counts rather than times: prefill FLOPs, the operators of a prefill and of a decoding step,
KV-cache and weight bytes."""


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


def count_generation_operators(model, inputs: dict, generation_kwargs: dict) -> dict[str, int]:
    """
    The operators `generate` dispatches, eagerly, for the prefill (a one-token answer: the set-up, the prefill forward
    pass and the choice of the first token) and for one decoding step (a two-token answer less a one-token one). Where
    launches dominate, these counts and not the FLOPs set the time to first token and the time per token.
    """
    import torch

    counts = {}
    for new_tokens in (1, 2):
        operators = operator_counter()
        with torch.inference_mode(), operators:
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **generation_kwargs)
        counts[new_tokens] = operators.count
    return {"prefill": counts[1], "decode_step": counts[2] - counts[1]}


def parameter_bytes(model) -> int:
    return sum(parameter.nbytes for parameter in model.parameters())
