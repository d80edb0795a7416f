"""FlashSloth core model: the pure SAP/EmbQ helpers, batching, caching, backends, saving and loading."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import CompileConfig

from flashsloth import FlashSlothConfig, FlashSlothForConditionalGeneration, FlashSlothModel
from flashsloth.modeling_flashsloth import (
    CACHE_ARGUMENT,
    attention_pool,
    build_query_block_layout,
    window_partition,
)
from model_helpers import (
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    MIXED_SAMPLES as SAMPLES,
    QUERY_TOKEN_ID,
    collate,
    make_sample,
    tiny_config,
    tiny_model,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_window_partition_matches_a_loop():
    grid, window, dim = 6, 3, 5
    features = torch.randn(2, grid * grid, dim)
    windows = window_partition(features, grid, window)
    assert windows.shape == (2, 4, 9, dim)
    grid_view = features.view(2, grid, grid, dim)
    for crop in range(2):
        for window_index in range(4):
            row, column = divmod(window_index, grid // window)
            expected = grid_view[crop, row * 3 : row * 3 + 3, column * 3 : column * 3 + 3].reshape(9, dim)
            torch.testing.assert_close(windows[crop, window_index], expected, rtol=0, atol=0)


def test_attention_pool_is_a_softmax_weighted_sum():
    windows, scores = torch.randn(2, 4, 9, 5), torch.randn(2, 4, 9)
    pooled, weights = attention_pool(windows, scores)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    expected = (torch.softmax(scores, -1)[..., None] * windows).sum(2)
    torch.testing.assert_close(pooled, expected)


def test_query_block_layout_multi_turn_multi_image():
    config = tiny_config()
    samples = [make_sample([(1, 1, 4, True), (1, 5, 2, True)], seed=0), make_sample([(0, 1, 3, False)], seed=1)]
    batch = collate(samples)
    layout = build_query_block_layout(batch["input_ids"], batch["instruction_mask"], batch["image_num_crops"], config)
    length = batch["input_ids"].shape[1]
    assert layout.query_positions.shape == (2, 9)
    assert (batch["input_ids"].flatten()[layout.query_positions] == QUERY_TOKEN_ID).all()
    # Block 1 reads 4 text tokens, block 2 reads 2; block 1 sees image 1 (36 rows), block 2 both images (36 + 180).
    assert layout.text_mask.sum(1).tolist() == [4, 2]
    assert layout.image_mask.sum(1).tolist() == [36, 216]
    assert layout.image_rows[0, :36].tolist() == list(range(36))
    assert layout.image_rows[1, :216].tolist() == list(range(216))
    # Text positions are in sample 0 and sit right before the block's query tokens (there: text then block).
    assert (layout.text_positions[layout.text_mask] < length).all()
    assert layout.text_positions[0, 3] + 1 == layout.query_positions[0, 0]


def test_query_block_layout_without_instruction_mask_reads_after_image_and_newline():
    config = tiny_config()
    sample = make_sample([(1, 1, 4, True), (0, 1, 2, True)], seed=3)
    batch = collate([sample])
    explicit = build_query_block_layout(batch["input_ids"], batch["instruction_mask"], batch["image_num_crops"], config)
    derived = build_query_block_layout(batch["input_ids"], None, batch["image_num_crops"], config)
    # First block: identical span. Later blocks fall back to "everything after the previous block".
    first = explicit.text_positions[0][explicit.text_mask[0]]
    assert derived.text_positions[0][derived.text_mask[0]].tolist() == first.tolist()
    assert derived.text_mask[1].sum() > explicit.text_mask[1].sum()


def test_query_block_layout_is_host_data_sent_in_two_tensors():
    """The layout is computed from the ids in Python: building it dispatches at most five tensor operations (its two
    tensors, on a GPU two copies, and the three that expand the image rows), whatever the batch, instead of a kernel
    per step of the layout math."""
    from flashsloth.bench.counting import operator_counter

    config = tiny_config()
    samples = [make_sample([(1, 1, 4, True), (1, 5, 2, True)], seed=0), make_sample([(1, 1, 3, True)], seed=1)]
    batch = collate(samples)
    counter = operator_counter()
    with counter:
        layout = build_query_block_layout(batch["input_ids"], batch["instruction_mask"], batch["image_num_crops"], config)
    assert counter.count <= 5
    # The same layout from host ids, and the flags EmbQ reads: every block here has text and an image before it.
    from_lists = build_query_block_layout(
        batch["input_ids"].tolist(), batch["instruction_mask"].tolist(), batch["image_num_crops"].tolist(), config
    )
    for name in ("query_positions", "text_positions", "text_mask", "image_rows", "image_mask", "has_text", "has_image"):
        assert torch.equal(getattr(layout, name), getattr(from_lists, name)), name
    assert layout.has_text.tolist() == layout.has_image.tolist() == [True, True, True]
    assert layout.image_num_crops == (1, 5, 1)
    # Padded entries are masked out and point at valid rows: 0 for text, the block's last image row for images.
    assert (layout.text_positions[~layout.text_mask] == 0).all()
    assert (layout.image_rows[0, 36:] == 35).all() and layout.image_mask[0].sum() == 36


def test_query_block_without_image_before_it_is_flagged():
    """A block whose image comes after it reads no image: EmbQ leaves its query states unchanged."""
    config = tiny_config()
    sample = make_sample([(1, 1, 4, True)], seed=2)
    ids = torch.tensor(sample["input_ids"])
    image_positions = [p for p, token in enumerate(sample["input_ids"]) if token == IMAGE_TOKEN_ID]
    query_positions = [p for p, token in enumerate(sample["input_ids"]) if token == QUERY_TOKEN_ID]
    # Move the image placeholders behind the query block: text, queries, then the image.
    order = [p for p in range(len(ids)) if p not in image_positions] + image_positions
    input_ids = ids[order][None]
    assert query_positions and input_ids[0, -1] == IMAGE_TOKEN_ID
    layout = build_query_block_layout(input_ids, None, torch.tensor([1]), config)
    assert layout.has_image.tolist() == [False] and not layout.image_mask.any()


def test_image_straddling_two_samples_is_a_clear_error():
    """Placeholder counts that add up over the batch but not per sample (one 2-crop image spread over two samples)."""
    config = tiny_config()
    batch = collate([make_sample([(1, 1, 4, True)], seed=0), make_sample([(1, 1, 3, True)], seed=1)])
    with pytest.raises(ValueError, match="Sample 0 holds .* image tokens, which do not split into its images"):
        build_query_block_layout(batch["input_ids"], batch["instruction_mask"], torch.tensor([2]), config)


def test_query_block_of_wrong_size_is_a_clear_error(model):
    batch = collate([make_sample([(1, 1, 4, True)])])
    batch["input_ids"][0, -2] = QUERY_TOKEN_ID  # a tenth query token
    with pytest.raises(ValueError, match="exactly 9 consecutive query tokens"):
        model(**batch)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(num_crops=5, projector_type="linear")
    config.save_pretrained(tmp_path)
    reloaded = FlashSlothConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.text_config.model_type == "phi" and reloaded.vision_config.model_type == "siglip_vision_model"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "flashsloth"
    assert saved["auto_map"]["AutoModelForImageTextToText"] == "modeling_flashsloth.FlashSlothForConditionalGeneration"


def test_invalid_config_is_a_clear_error():
    with pytest.raises(ValueError, match="pooling_window=4 must divide"):
        tiny_config(pooling_window=4)
    with pytest.raises(ValueError, match="query_layer_index=9"):
        tiny_config(query_layer_index=9)


def test_vision_tower_stops_at_the_feature_layer(model):
    tower = model.model.vision_tower
    assert len(tower.encoder.layers) == 2  # 3 layers configured, feature layer -2
    assert isinstance(tower.post_layernorm, torch.nn.Identity)
    assert not any("post_layernorm" in name or ".head." in name for name in model.state_dict())


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_each_sample_alone(model, padding_side):
    samples = [make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)]
    batch = collate(samples, padding_side=padding_side)
    with torch.no_grad():
        batch_logits = model(**batch).logits
        for index, sample in enumerate(samples):
            alone = model(**collate([sample])).logits[0]
            length = alone.shape[0]
            rows = batch_logits[index, -length:] if padding_side == "left" else batch_logits[index, :length]
            torch.testing.assert_close(rows, alone, atol=1e-4, rtol=0)


def test_batched_generation_equals_each_sample_alone(model):
    samples = [make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)]
    batch = collate(samples)
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for index, sample in enumerate(samples):
            single = collate([sample])
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1] :]
            assert batched[index].tolist() == alone.tolist()


@pytest.mark.parametrize("cache", ["uncached", "static"])
def test_cached_generation_equals_other_cache_modes(model, cache):
    batch = collate([make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES[:3])])
    options = {"use_cache": False} if cache == "uncached" else {"cache_implementation": "static"}
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=8, do_sample=False)
        other = model.generate(**batch, max_new_tokens=8, do_sample=False, **options)
    assert other.tolist() == reference.tolist()


def graph_recorder():
    """A torch.compile backend that runs each graph as traced, and the list it fills with the number of crops in each
    graph's pixel input (0: none). A function, not an object: `generate` deep-copies its compile config."""
    pixel_batches = []

    def backend(graph_module, example_inputs):
        pixels = [
            tensor.shape[0]
            for tensor in example_inputs
            if isinstance(tensor, torch.Tensor) and tensor.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        ]
        pixel_batches.append(pixels[0] if pixels else 0)
        return graph_module.forward

    return backend, pixel_batches


@pytest.mark.parametrize("chunk", ["prompt", "default"])
def test_compiled_prefill_and_decoding_equal_eager_generation(model, chunk):
    """`prefill_chunk_size` >= the prompt puts the prefill through the compiled forward too: in one graph (fullgraph),
    images, HD crops, several blocks and text-only samples in one batch, and the same tokens as eager generation.
    With a static cache and no `prefill_chunk_size` ("default"), FlashSloth's `generate` makes the prompt one chunk
    itself: the static cache is the one switch. (Before transformers 5.25, `generate` drops the images of a chunked
    prefill; FlashSloth puts them back.)"""
    torch._dynamo.reset()
    batch = collate([make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)])
    backend, pixel_batches = graph_recorder()
    compile_config = CompileConfig(fullgraph=True, backend=backend, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
    compiled = copy.deepcopy(model)
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=6, do_sample=False)
        for _ in range(2):  # the second call reuses both graphs
            output = compiled.generate(
                **batch,
                max_new_tokens=6,
                do_sample=False,
                cache_implementation="static",
                compile_config=compile_config,
                **({"prefill_chunk_size": batch["input_ids"].shape[1]} if chunk == "prompt" else {}),
            )
            assert output.tolist() == reference.tolist()
    assert pixel_batches == [batch["pixel_values"].shape[0], 0]  # the prefill with every crop, then a step


def test_prebuilt_query_layout_equals_the_one_built_in_forward(model):
    batch = collate([make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)])
    layout = model.model.build_query_layout(
        batch["input_ids"], batch["instruction_mask"], batch["image_num_crops"], batch["pixel_values"].shape[0]
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, query_layout=layout).logits, model(**batch).logits, atol=0, rtol=0)
    prefill = model.prepare_inputs_for_generation(**batch, is_first_iteration=True)
    assert torch.equal(prefill["query_layout"].query_positions, layout.query_positions)
    assert torch.equal(prefill["query_layout"].image_rows, layout.image_rows)
    text_only = collate([make_sample(SAMPLES[-1])])
    assert "query_layout" not in model.prepare_inputs_for_generation(**text_only, is_first_iteration=True)


@pytest.mark.parametrize("speculation", ["prompt_lookup", "assistant_model"])
def test_speculative_decoding_equals_greedy(model, speculation):
    """Both read the cache back from the outputs (transformers 5.25 names it `cache`) and crop it after a rejection."""
    batch = collate([make_sample(SAMPLES[0])])
    options = {"prompt_lookup_num_tokens": 3} if speculation == "prompt_lookup" else {"assistant_model": tiny_model(1)}
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=8, do_sample=False)
        speculative = model.generate(**batch, max_new_tokens=8, do_sample=False, **options)
    assert speculative.tolist() == reference.tolist()


def test_outputs_carry_the_cache_under_the_name_generate_reads(model):
    batch = collate([make_sample(SAMPLES[0])])
    with torch.no_grad():
        outputs = model(**batch, use_cache=True)
    cache = outputs[CACHE_ARGUMENT]
    assert cache is not None and cache.get_seq_length() == batch["input_ids"].shape[1]


def test_eager_equals_sdpa():
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    assert eager.model.embedded_query.text_attention.config._attn_implementation == "eager"
    batch = collate([make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)])
    real_tokens = batch["attention_mask"].bool()  # padding rows attend to nothing: backends fill them differently
    with torch.no_grad():
        torch.testing.assert_close(
            eager(**batch).logits[real_tokens], sdpa(**batch).logits[real_tokens], atol=1e-5, rtol=0
        )


def test_embq_reads_its_instruction_and_only_earlier_images(model):
    sample = make_sample([(1, 1, 4, True), (1, 1, 3, True)], seed=5)
    batch = collate([sample])
    captured = []
    handle = model.model.embedded_query.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model(**batch)
        changed_second_image = dict(batch, pixel_values=batch["pixel_values"].clone())
        changed_second_image["pixel_values"][1] = -changed_second_image["pixel_values"][1]
        model(**changed_second_image)
        changed_instruction = dict(batch, instruction_mask=torch.zeros_like(batch["instruction_mask"]))
        model(**changed_instruction)
    handle.remove()
    original, second_image, no_instruction = captured
    torch.testing.assert_close(second_image[0], original[0])  # block 1 comes before image 2
    assert (second_image[1] - original[1]).abs().max() > 1e-4  # block 2 reads image 2
    assert (no_instruction - original).abs().max() > 1e-4


def test_text_only_inputs_skip_vision_and_embq(model):
    batch = collate([make_sample([(0, 1, 8, False)])])
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        with_empty_pixels = model(**batch).logits
        without_pixels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    handle.remove()
    assert calls == []
    torch.testing.assert_close(with_empty_pixels, without_pixels)


def test_image_token_count_mismatch_is_a_clear_error(model):
    batch = collate([make_sample([(1, 1, 4, True)])])
    batch["input_ids"][0, 3] = 50 if batch["input_ids"][0, 3] == IMAGE_TOKEN_ID else IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match="image tokens"):
        model(**batch)


def test_bad_pixel_values_are_a_clear_error(model):
    batch = collate([make_sample([(1, 1, 4, True)])])
    with pytest.raises(ValueError, match="pixel_values must be a floating point tensor of shape"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:, :, :50]))
    with pytest.raises(ValueError, match="image_num_crops adds up to 2"):
        model(**dict(batch, image_num_crops=torch.tensor([2])))


def test_flash_attention_without_the_package_names_the_fix():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="(?i)flash"):
        FlashSlothForConditionalGeneration(tiny_config(attn_implementation="flash_attention_2"))


def test_save_and_reload_in_safetensors(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert {"configuration_flashsloth.py", "modeling_flashsloth.py"} <= {path.name for path in tmp_path.glob("*.py")}
    reloaded = FlashSlothForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = collate([make_sample([(1, 5, 4, True)])])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    base = FlashSlothModel.from_pretrained(tmp_path)
    assert isinstance(base, FlashSlothModel)


def test_loads_with_auto_classes_in_a_fresh_process_from_the_flat_files(model, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    batch = collate([make_sample([(1, 1, 4, True)])])
    torch.save({**batch}, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, tmp_path / "logits.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["flashsloth"] = None  # the package must not be importable: only the flat remote files
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
        path = {str(checkpoint)!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True)
        with torch.no_grad():
            # Not bit-exact: the thread pools of two processes may split the matmuls differently.
            torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)
        assert type(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)).__name__ == (
            "FlashSlothForConditionalGeneration")
        assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == "FlashSlothModel"
        assert AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == "flashsloth"
        print("fresh-process-ok")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fresh-process-ok" in result.stdout


def test_gradient_checkpointing_trains():
    model = tiny_model().train()
    model.gradient_checkpointing_enable()
    batch = collate([make_sample([(1, 1, 5, True)]), make_sample([(2, 1, 3, True)], seed=1)])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        assert model.model.query_tokens.grad.abs().sum() > 0
        assert model.model.embedded_query.up_proj.weight.grad.abs().sum() > 0
        assert model.model.spatial_pooling.fc2.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gradients_equal_with_and_without_checkpointing():
    batch = collate([make_sample([(1, 1, 5, True)])])
    labels = batch["input_ids"].clone()
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.config.pooling_dropout = 0.0
        model.model.spatial_pooling.dropout.p = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        gradients.append(model.model.embedded_query.text_down_proj.weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1])


def test_device_map_auto_offloads_without_meta_tensor_errors(model, tmp_path):
    pytest.importorskip("accelerate")
    assert {"FlashSlothEmbeddedQuery", "PhiDecoderLayer", "SiglipEncoderLayer"} <= set(model._no_split_modules)
    model.save_pretrained(tmp_path / "checkpoint")
    # A memory budget far below the model's size forces most modules onto disk.
    offloaded = FlashSlothForConditionalGeneration.from_pretrained(
        tmp_path / "checkpoint",
        device_map="auto",
        max_memory={"cpu": 300_000, "disk": 10**10},
        offload_folder=tmp_path / "offload",
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    batch = collate([make_sample([(1, 1, 4, True)])])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch).logits, model(**batch).logits)


def test_bf16_forward(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = FlashSlothForConditionalGeneration.from_pretrained(tmp_path, device_map="auto", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    batch = collate([make_sample([(1, 1, 4, True)])])
    with torch.no_grad():
        logits = loaded(**batch).logits
        reference = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1


def test_full_size_parameter_count_matches_the_paper():
    with torch.device("meta"):
        model = FlashSlothForConditionalGeneration(FlashSlothConfig())
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert abs(parameters - 3.2e9) / 3.2e9 < 0.01, parameters
    assert model.model.vision_tower.config.num_hidden_layers == 27
    assert len(model.model.vision_tower.encoder.layers) == 26


def test_average_pooling_ablation_takes_the_mean_of_each_window():
    model = tiny_model(pooling_type="average")
    assert not hasattr(model.model.spatial_pooling, "fc1")
    vision_features = torch.randn(2, 36, model.config.vision_config.hidden_size)
    pooled, weights = model.model.spatial_pooling(vision_features)
    windows = window_partition(vision_features, grid_size=6, window_size=3)
    torch.testing.assert_close(pooled, windows.mean(dim=2))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 9))


def test_model_without_embq_leaves_query_tokens_unrefined():
    with_embq, without_embq = tiny_model(seed=3), tiny_model(seed=3, use_embedded_query=False)
    assert without_embq.model.embedded_query is None
    assert "embedded_query" not in "".join(without_embq.state_dict())
    without_embq.load_state_dict(with_embq.state_dict(), strict=False)
    batch = collate([make_sample([(1, 1, 4, True)], seed=2)])
    # Zeroing EmbQ's output projection makes it a no-op: the model without EmbQ must then give the same logits.
    with torch.no_grad():
        with_embq.model.embedded_query.up_proj.weight.zero_()
        with_embq.model.embedded_query.up_proj.bias.zero_()
        torch.testing.assert_close(without_embq(**batch).logits, with_embq(**batch).logits)


def test_unknown_pooling_type_is_a_clear_error():
    with pytest.raises(ValueError, match="pooling_type='max'"):
        tiny_config(pooling_type="max")
