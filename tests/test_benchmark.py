"""The speed benchmark at size `tiny`: it runs end to end, writes well-formed JSON, markdown and PNG, and what it counts
(visual tokens, prefill FLOPs, KV-cache bytes) agrees with hand counts from the configs. No timing assertions."""

import copy
import json

import pytest
import torch

from flashsloth import cli
from flashsloth.bench import (
    MODEL_NAMES,
    SMOLVLM_TOKEN_IDS,
    TILED_PEER,
    VARIANT_CROPS,
    BenchmarkSettings,
    PromptLayout,
    benchmark_configs,
    build_inputs,
    build_models,
    build_tiled_peer,
    build_tiled_peer_inputs,
    evaluate_goals,
    format_markdown,
    generation_kwargs,
    main,
    operator_counter,
    tiled_peer_config,
)
from flashsloth.layout_flashsloth import TEXT_WIDTH_MULTIPLE

LAYOUT = PromptLayout()
SHORT, LONG = 3, 5


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    paths = {kind: folder / f"speed.{kind}" for kind in ("json", "md", "png")}
    # On the CPU wherever it runs: the hand counts below assume float32 and the CPU attention kernel.
    argv = ["--size", "tiny", "--device", "cpu", "--repeats", "1", "--batch-sizes", "1", "2", "--threads", "1"]
    argv += ["--short-new-tokens", str(SHORT), "--long-new-tokens", str(LONG)]
    argv += ["--json", str(paths["json"]), "--markdown", str(paths["md"]), "--plot", str(paths["png"])]
    argv += ["--profile", str(folder), "--smolvlm"]
    assert main(argv) == 0
    return json.loads(paths["json"].read_text()), paths


@pytest.fixture(scope="module")
def configs():
    return benchmark_configs("tiny")


# Hand counts of multiply-adds x 2, the way torch's FLOP counter counts matmuls, convolutions and attention.
def linear(rows, fan_in, fan_out):
    return 2 * rows * fan_in * fan_out


def attention(heads, queries, keys, head_dim, value_head_dim=None):
    return 2 * heads * queries * keys * (head_dim + (value_head_dim or head_dim))


def siglip_flops(vision_config, crops, layers):
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    rows, width, heads = crops * patches, vision_config.hidden_size, vision_config.num_attention_heads
    patch_embedding = linear(rows, 3 * vision_config.patch_size**2, width)
    layer = 4 * linear(rows, width, width) + linear(rows, width, vision_config.intermediate_size) * 2
    layer += crops * attention(heads, patches, patches, width // heads)
    return patch_embedding + layers * layer


def phi_flops(text_config, tokens):
    width, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = width // heads
    layer = 4 * linear(tokens, width, width) + linear(tokens, width, text_config.intermediate_size) * 2
    layer += attention(heads, tokens, tokens, head_dim)
    lm_head = linear(1, width, text_config.vocab_size)  # generate keeps the last position's logits only
    return text_config.num_hidden_layers * layer + lm_head


def expected_prefill_flops(config, model_name, crops):
    vision, text = config.vision_config, config.text_config
    width, text_width = vision.hidden_size, text.hidden_size
    patches = crops * config.patch_grid_size**2
    tokens = LAYOUT.text_tokens + patches if model_name == "peer" else LAYOUT.text_tokens
    flops = siglip_flops(vision, crops, config.num_vision_layers)
    if model_name == "peer":
        return (
            flops
            + linear(patches, width, text_width)
            + linear(patches, text_width, text_width)
            + phi_flops(text, tokens)
        )
    pooled, queries = crops * config.image_tokens_per_crop, config.num_query_tokens
    # EmbQ reads the instruction padded to a multiple of TEXT_WIDTH_MULTIPLE tokens (a stable shape per length bucket).
    question = -(-LAYOUT.question_tokens // TEXT_WIDTH_MULTIPLE) * TEXT_WIDTH_MULTIPLE
    query_width, heads = config.query_hidden_size, config.query_num_heads
    sap = linear(patches, width, width) + linear(patches, width, 1) + 2 * patches * width
    projector = linear(pooled, width, text_width) + linear(pooled, text_width, text_width)
    text_attention = linear(queries + question, text_width, query_width) + linear(queries, query_width, query_width)
    text_attention += 2 * linear(question, query_width, query_width)
    text_attention += attention(heads, queries, question, query_width // heads)
    image_attention = linear(patches, width, query_width) + linear(queries, query_width, query_width)
    image_attention += linear(patches, query_width, query_width) + linear(patches, width, width)
    image_attention += attention(heads, queries, patches, query_width // heads, width // heads)
    up = linear(queries, width, text_width)
    embq = text_attention + image_attention + up
    return flops + sap + projector + embq + phi_flops(text, tokens + pooled + queries)


def expected_tiled_peer_flops(config):
    """SigLIP on 17 tiles, the pixel shuffle's linear projection (9 patches per token), a Llama decoder (gated MLP)."""
    vision, text = config.vision_config, config.text_config
    tiles, tile_tokens = 17, (vision.image_size // vision.patch_size // config.scale_factor) ** 2
    tokens = LAYOUT.text_tokens + tiles * tile_tokens + 16 * 2 + 4 + 4
    connector = linear(tiles * tile_tokens, vision.hidden_size * config.scale_factor**2, text.hidden_size)
    width, heads, head_dim = text.hidden_size, text.num_attention_heads, text.head_dim
    kv_width = text.num_key_value_heads * head_dim
    layer = 2 * linear(tokens, width, width) + 2 * linear(tokens, width, kv_width)
    layer += 3 * linear(tokens, width, text.intermediate_size) + attention(heads, tokens, tokens, head_dim)
    lm_head = linear(1, width, text.vocab_size)
    return siglip_flops(vision, tiles, vision.num_hidden_layers) + connector + text.num_hidden_layers * layer + lm_head


def test_outputs_are_well_formed(bench_run):
    report, paths = bench_run
    assert report["size"] == "tiny" and report["dtype"] == "float32"
    assert set(report["variants"]) == {"base", "hd"}
    # The SmolVLM-sized peer runs in the base variant only, at batch 1 only.
    assert TILED_PEER in report["variants"]["base"] and TILED_PEER not in report["variants"]["hd"]
    for variant, results in report["variants"].items():
        names = [*MODEL_NAMES, TILED_PEER] if variant == "base" else list(MODEL_NAMES)
        for name in names:
            entry = results[name]
            assert 0 < entry["ttft_s"] < entry[f"response_{SHORT}_s"]
            assert entry["decode_ms_per_token"] > 0
            assert entry["peak_memory_bytes"] >= entry["weight_bytes"] > 0
            assert len(entry["samples_s"]["ttft"]) == 1
            batches = {"1", "2"} if variant == "base" and name != TILED_PEER else {"1"}
            assert set(entry["throughput_tokens_per_s"]) == batches
            assert all(value > 0 for value in entry["throughput_tokens_per_s"].values())
            assert (f"response_{LONG}_s" in entry) == (variant == "base")  # long answers: base variant only
        parts = results["flashsloth"]["prefill_parts_s"]
        assert 0 < parts["sap"] + parts["embq"] < parts["prefill"]
        for peer, advantage_key in (("peer", "advantage"), (TILED_PEER, "advantage_smolvlm")):
            if peer in results:
                advantage = results[advantage_key]
                assert advantage["ttft_s"] == pytest.approx(results[peer]["ttft_s"] / results["flashsloth"]["ttft_s"])
                assert advantage[f"response_{SHORT}_s"] > 0
    assert set(report["variants"]["base"]["advantage_smolvlm"]["throughput_tokens_per_s"]) == {"1"}
    goals = {goal["name"]: goal for goal in report["goals"]}
    assert (
        "base: TTFT ratio / counted-FLOP ratio" in goals and "base: throughput at batch 2, FlashSloth / peer" in goals
    )
    assert all(isinstance(goal["met"], bool) for goal in goals.values())

    markdown = paths["md"].read_text()
    assert markdown == format_markdown(report)
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "goal" not in line]
    metric_rows = [line for line in table if line.count("|") == 10]  # metric + base's 5 columns + hd's 3
    assert len(metric_rows) >= 12 and metric_rows[0].startswith("| metric | FlashSloth | peer (1 x 729) | advantage |")
    assert "| SmolVLM-sized (17 tiles) | advantage | FlashSloth HD |" in metric_rows[0]
    visual_tokens_row = "| visual tokens per image | 90 | 729 | **8.10x** | 1,377 | **15.30x** | 414 |"
    assert any(line.startswith(visual_tokens_row) for line in metric_rows)
    batch_row = "| throughput, batch 2 (tokens/s, 3 new) |"  # the SmolVLM-sized peer runs at batch 1 only
    assert any(line.startswith(batch_row) and "| – | – |" in line for line in metric_rows)
    assert sum(line.count("|") == 5 for line in table) == len(goals)  # the goal table, one row per goal

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    matplotlib = pytest.importorskip("matplotlib.image")
    image = matplotlib.imread(str(paths["png"]))
    assert image.shape[0] > 200 and image.shape[1] > 600 and image.std() > 0


def test_visual_tokens_follow_the_configs(bench_run, configs):
    report, _ = bench_run
    config = configs[0]
    assert config.patch_grid_size == 27 and config.image_tokens_per_crop == 81  # 384 px, 14 px patches, 3x3 windows
    for variant, crops in VARIANT_CROPS.items():
        results = report["variants"][variant]
        assert results["flashsloth"]["visual_tokens"] == 81 * crops + 9
        assert results["peer"]["visual_tokens"] == 729 * crops
        assert results["flashsloth"]["prompt_tokens"] == LAYOUT.text_tokens + 81 * crops + 9
        assert results["peer"]["prompt_tokens"] == LAYOUT.text_tokens + 729 * crops
    # 4 x 4 tiles and the whole image, 81 tokens each; each tile opens with 2 markers, each row ends with a newline,
    # the whole image has a newline and 3 markers around it.
    tiled = report["variants"]["base"][TILED_PEER]
    assert tiled["visual_tokens"] == 17 * 81
    assert tiled["prompt_tokens"] == LAYOUT.text_tokens + 17 * 81 + 16 * 2 + 4 + 4
    assert LAYOUT.text_tokens == 50 and LAYOUT.prefix_tokens == 32  # the real one-turn prompt with Phi-2's tokenizer


def test_kv_cache_bytes_are_the_formula_and_what_the_cache_holds(bench_run, configs):
    report, _ = bench_run
    text = configs[0].text_config
    head_dim = text.hidden_size // text.num_attention_heads
    for results in report["variants"].values():
        for name in MODEL_NAMES:
            entry = results[name]
            expected = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * entry["prompt_tokens"] * 4
            assert entry["kv_cache_bytes"] == entry["kv_cache_bytes_measured"] == expected
    assert report["variants"]["base"]["advantage"]["kv_cache_bytes"] == pytest.approx(779 / 140)
    tiled, text = report["variants"]["base"][TILED_PEER], tiled_peer_config("tiny").text_config
    expected = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * tiled["prompt_tokens"] * 4
    assert tiled["kv_cache_bytes"] == tiled["kv_cache_bytes_measured"] == expected


def test_counted_prefill_flops_equal_hand_counts(bench_run, configs):
    report, _ = bench_run
    for variant, crops in VARIANT_CROPS.items():
        for name in MODEL_NAMES:
            assert report["variants"][variant][name]["prefill_flops"] == expected_prefill_flops(configs[0], name, crops)
    tiled_flops = report["variants"]["base"][TILED_PEER]["prefill_flops"]
    assert tiled_flops == expected_tiled_peer_flops(tiled_peer_config("tiny"))


def test_profile_writes_a_trace_and_an_operator_table_per_model(bench_run):
    report, paths = bench_run
    profile = report["profile"]
    assert profile["variant"] == "base" and set(profile["models"]) == {*MODEL_NAMES, TILED_PEER}
    for name, summary in profile["models"].items():
        assert summary["wall_s"] > 0 and "device_busy_s" not in summary  # on the CPU: no device time to report
        trace = json.loads(open(summary["trace"]).read())
        assert any(
            event.get("name") == "aten::mm" or event.get("name") == "aten::addmm" for event in trace["traceEvents"]
        )
        table = open(summary["table"]).read()
        assert "Self CPU" in table and "aten::" in table
        assert summary["table"] in paths["md"].read_text()


def test_operator_counter_counts_data_producing_operators_only():
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    with operator_counter() as counter:
        torch.mm(a, b).relu().view(-1).sum()
    assert counter.count == 3  # mm, relu, sum
    with operator_counter() as counter:
        torch.mm(a, b).relu().t().reshape(-1).sum()
    assert counter.count == 4  # the reshape of a transposed tensor copies it: one more


def test_prefill_operators_are_counted_for_both_models(bench_run):
    for results in bench_run[0]["variants"].values():
        ours, peer = results["flashsloth"]["prefill_operators"], results["peer"]["prefill_operators"]
        # Same vision tower and decoder depth: FlashSloth adds SAP, EmbQ and their layout, never fewer operators.
        assert ours > peer > 0
        assert results["advantage"]["prefill_operators"] == pytest.approx(peer / ours)
    assert bench_run[0]["variants"]["base"][TILED_PEER]["prefill_operators"] > 0


def test_generation_operators_are_the_prefill_and_one_decoding_step(bench_run, configs):
    for results in bench_run[0]["variants"].values():
        for name in ("flashsloth", "peer"):
            entry = results[name]
            # generate's prefill is the forward pass plus its own set-up and the choice of the first token.
            assert entry["generate_prefill_operators"] > entry["prefill_operators"]
            assert entry["decode_step_operators"] > 0
        advantage = results["advantage"]["decode_step_operators"]
        assert advantage == pytest.approx(
            results["peer"]["decode_step_operators"] / results["flashsloth"]["decode_step_operators"]
        )
    # One step is one step: a third token costs what the second did.
    flashsloth, _ = build_models("tiny", torch.float32, "cpu")
    inputs = build_inputs(configs[0], "flashsloth", 1, 1, LAYOUT)
    kwargs = generation_kwargs(configs[0], BenchmarkSettings(), "cpu")
    counts = {}
    for new_tokens in (2, 3):
        with operator_counter() as counter, torch.inference_mode():
            flashsloth.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        counts[new_tokens] = counter.count
    assert counts[3] - counts[2] == bench_run[0]["variants"]["base"]["flashsloth"]["decode_step_operators"]


def test_overhead_size_has_the_full_depths_and_geometry_with_tiny_widths():
    overhead, peer = benchmark_configs("overhead")
    full, _ = benchmark_configs("full")
    assert overhead.num_vision_layers == full.num_vision_layers == 26
    assert overhead.text_config.num_hidden_layers == full.text_config.num_hidden_layers == 32
    assert overhead.query_layer_index == full.query_layer_index == 7
    assert overhead.image_tokens_per_crop == full.image_tokens_per_crop == 81
    assert overhead.patch_grid_size == full.patch_grid_size == 27 and peer.image_seq_length == 729
    assert overhead.vision_config.hidden_size <= 64 and overhead.text_config.hidden_size <= 64
    assert tiled_peer_config("overhead").text_config.num_hidden_layers == 24


def test_overhead_goals_compare_operators_and_host_times():
    advantage = {
        "generate_prefill_operators": 0.94,
        "decode_step_operators": 1.0,
        "ttft_s": 1.2,
        "decode_ms_per_token": 0.99,
        "kv_cache_bytes": 5.56,
        "throughput_tokens_per_s": {},
    }
    parts = {"sap": 1.0, "embq": 1.0, "layout": 1.0, "prefill": 100.0}
    report = {
        "size": "overhead",
        "device": "cpu",
        "settings": {"short_new_tokens": 8},
        "variants": {"base": {"advantage": advantage, "flashsloth": {"prefill_parts_s": parts}}},
    }
    goals = {goal["name"]: goal["met"] for goal in evaluate_goals(report)}
    assert goals["base: operators per prefill, peer / FlashSloth"] is False
    assert goals["base: operators per decoding step, peer / FlashSloth"] is True
    assert goals["base: host time per prefill (TTFT), peer / FlashSloth"] is True
    assert goals["base: decode ms/token, peer / FlashSloth"] is False
    assert not any("counted-FLOP" in name for name in goals)  # no FLOP ceiling where arithmetic is negligible


def test_full_size_flop_ratios_are_the_issue_ceilings():
    config = benchmark_configs("full")[0]
    assert config.num_vision_layers == 26 and config.text_config.num_hidden_layers == 32
    base = expected_prefill_flops(config, "peer", 1) / expected_prefill_flops(config, "flashsloth", 1)
    hd = expected_prefill_flops(config, "peer", 5) / expected_prefill_flops(config, "flashsloth", 5)
    assert base == pytest.approx(3.4, abs=0.15) and hd == pytest.approx(4.7, abs=0.1)  # "about 3.4x", "about 4.7x"


def test_peer_is_native_llava_on_flashsloths_own_modules():
    flashsloth, peer = build_models("tiny", torch.float32, "cpu")
    assert type(peer).__name__ == "LlavaForConditionalGeneration"
    assert peer.model.language_model is flashsloth.model.language_model and peer.lm_head is flashsloth.lm_head
    inputs = build_inputs(flashsloth.config, "peer", 5, 1, LAYOUT)
    with torch.inference_mode():
        features = flashsloth.get_image_features(inputs["pixel_values"]).last_hidden_state
        expected = flashsloth.model.multi_modal_projector.linear_2(
            torch.nn.functional.gelu(flashsloth.model.multi_modal_projector.linear_1(features))
        )
        peer_features = peer.get_image_features(inputs["pixel_values"]).pooler_output
    assert len(peer_features) == 5 and peer_features[0].shape == (729, flashsloth.config.text_config.hidden_size)
    torch.testing.assert_close(torch.stack(peer_features), expected)


def test_tiled_peer_is_native_smolvlm_at_its_default_tiling():
    """The SmolVLM-sized peer is transformers' SmolVLM, and its prompt is what SmolVLM's own processor makes of a
    square image at SmolVLM-Instruct's settings (longest edge 4 x 384, 384-pixel tiles): 4 x 4 tiles plus the whole
    image, laid out token for token like `get_image_prompt_string`."""
    import re

    import numpy
    from PIL import Image
    from transformers import SmolVLMImageProcessor
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    model = build_tiled_peer("tiny", torch.float32, "cpu")
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    config = model.config
    image = Image.fromarray(numpy.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=numpy.uint8))
    processor = SmolVLMImageProcessor(size={"longest_edge": 4 * 384}, max_image_size={"longest_edge": 384})
    processed = processor(images=[[image]], return_row_col_info=True, return_tensors="pt")
    assert processed["rows"] == [[4]] and processed["cols"] == [[4]]

    inputs = build_tiled_peer_inputs(config, 2, LAYOUT)
    assert inputs["pixel_values"].shape == (2, *processed["pixel_values"].shape[1:])  # (batch, 17, 3, 384, 384)
    prompt = get_image_prompt_string(4, 4, 81, "<fake_token_around_image>", "<image>", "<global-img>")
    ids = SMOLVLM_TOKEN_IDS
    names = {"<fake_token_around_image>": ids["fake"], "<image>": ids["image"], "<global-img>": ids["global"]}
    names["\n"] = ids["newline"]
    for row in range(4):
        names.update({f"<row_{row + 1}_col_{col + 1}>": ids["first_row_col"] + 4 * row + col for col in range(4)})
    expected = [names[token] for token in re.findall(r"<[^>]+>|\n", prompt)]
    image_start = LAYOUT.prefix_tokens
    for sample in inputs["input_ids"]:
        assert sample[image_start : image_start + len(expected)].tolist() == expected
        assert sample.shape[0] == LAYOUT.text_tokens + len(expected)

    with torch.inference_mode():
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert len(features) == 2 and features[0].shape == (17 * 81, config.text_config.hidden_size)


def test_the_batching_goal_needs_a_batch_above_one(bench_run):
    report = copy.deepcopy(bench_run[0])
    for results in report["variants"].values():
        results["advantage"]["throughput_tokens_per_s"].pop("2", None)
    names = [goal["name"] for goal in evaluate_goals(report)]
    assert "base: TTFT ratio / counted-FLOP ratio" in names
    assert not any("throughput" in name for name in names)


def test_decoding_steps_skip_the_vision_tower_and_embq(monkeypatch):
    flashsloth, _ = build_models("tiny", torch.float32, "cpu")
    inputs = build_inputs(flashsloth.config, "flashsloth", 1, 2, LAYOUT)
    calls = []
    model = flashsloth.model
    insert_query_embeddings = model.insert_query_embeddings

    def counted_query_insertion(*args):
        calls.append("query insertion")
        return insert_query_embeddings(*args)

    monkeypatch.setattr(model, "insert_query_embeddings", counted_query_insertion)
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: calls.append(name))
        for name, module in (
            ("vision", model.vision_tower),
            ("embq", model.embedded_query),
            ("layer", model.language_model.layers[0]),
        )
    ]
    with torch.inference_mode():
        output_ids = flashsloth.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for handle in handles:
        handle.remove()
    assert output_ids.shape[1] == inputs["input_ids"].shape[1] + 4
    assert calls.count("vision") == 1 and calls.count("embq") == 1 and calls.count("layer") == 4
    assert calls.count("query insertion") == 1  # decoding steps feed generated tokens, never placeholders


def test_compiled_run_covers_every_prompt_with_one_prefill_chunk(tmp_path, bench_run):
    """`--compile`: the prefill chunk is at least the longest prompt (the peer's HD one), so `generate` runs each
    prefill whole through the compiled forward (tests/test_modeling.py checks that path). A compiled run on the CPU
    (inductor), the SmolVLM-sized peer included, completes and counts what the eager run counts."""
    settings = BenchmarkSettings(size="tiny", device="cpu", compile=True)
    config = benchmark_configs("tiny")[0]
    kwargs = generation_kwargs(config, settings, "cpu")
    assert kwargs["cache_implementation"] == "static" and kwargs["compile_config"]._compile_all_devices
    peer_hd_prompt = build_inputs(config, "peer", VARIANT_CROPS["hd"], 1, LAYOUT)["input_ids"].shape[1]
    assert kwargs["prefill_chunk_size"] >= peer_hd_prompt

    path = tmp_path / "compiled.json"
    argv = ["--size", "tiny", "--device", "cpu", "--compile", "--variants", "base", "--batch-sizes", "1"]
    argv += ["--repeats", "1", "--long-repeats", "0", "--short-new-tokens", str(SHORT), "--json", str(path)]
    argv += ["--smolvlm"]
    assert main(argv) == 0
    compiled, eager = json.loads(path.read_text()), bench_run[0]
    assert compiled["compile"] and not eager["compile"]
    for name in (*MODEL_NAMES, TILED_PEER):  # SmolVLM's own prefill breaks the graph (it filters tiles by value)
        result, reference = compiled["variants"]["base"][name], eager["variants"]["base"][name]
        assert result["prefill_flops"] == reference["prefill_flops"]
        assert result["ttft_s"] > 0


def test_cli_registers_bench_and_rejects_bad_settings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = capsys.readouterr().out
    options = (
        "--size",
        "--variants",
        "--batch-sizes",
        "--long-new-tokens",
        "--json",
        "--markdown",
        "--plot",
        "--compile",
    )
    for option in (*options, "--profile", "--smolvlm"):
        assert option in help_text
    assert cli.main(["bench", "--short-new-tokens", "8", "--long-new-tokens", "4"]) == 2
    assert "long answers more than short ones" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--batch-sizes", "0"])
    assert cli.main(["bench", "--json", "/no/such/folder/speed.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["bench", "--profile", "/no/such/folder"]) == 2
    assert "no such folder; create it first" in capsys.readouterr().err
