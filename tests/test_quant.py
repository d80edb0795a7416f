"""Quantized FlashSloth through transformers' torchao integration (flashsloth.quant), on the embedded demo model:
logits and greedy answers against fp32, save/reload, the clear errors, the CLI's --quantize."""

import json
import random

import pytest
import torch

from flashsloth import quant
from flashsloth.cli import QUANTIZE_CHOICES, main
from flashsloth.demo import DEMO_MODEL_DIR


torchao = pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[quant]'")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402


# Largest relative deviation of the logits from fp32 (max |q - r| / max |r| over every position of the prompts).
# Measured on the demo model (docs/quantization.md): int8 0.004, int4 (groups of 128; the demo's 96-wide vision layers
# stay bfloat16) about 0.02-0.09; the bounds leave a margin of ~2.5x and stay far below a broken kernel's (~1).
MAX_RELATIVE_DEVIATION = {"int8": 0.015, "int8-dynamic": 0.05, "int4": 0.2}


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)


@pytest.fixture(scope="module")
def fp32_model():
    return AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def questions(processor):
    """Three demo questions (one per kind) on freshly drawn scenes, as processor inputs, and their right answers."""
    from flashsloth.training import synthetic

    rng = random.Random("flashsloth-test-quant")
    samples = []
    for kind in synthetic.QUESTION_KINDS[:3]:
        scene, record = synthetic.make_sample(0, 2, rng, kinds=(kind,))
        image = synthetic.render_scene(scene, 2 * processor.image_processor.size["height"], rng)
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        samples.append((processor(images=[image], text=prompt, return_tensors="pt"), image, question))
    return samples


def logits_and_answers(model, processor, questions):
    logits, answers = [], []
    with torch.inference_mode():
        for inputs, _, _ in questions:
            batch = {**inputs, "pixel_values": inputs["pixel_values"].to(model.dtype)}
            logits.append(model(**batch).logits[0].float())
            output = model.generate(**batch, max_new_tokens=6, do_sample=False)
            answers.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return torch.cat(logits), answers


def load(scheme, directory=DEMO_MODEL_DIR):
    return quant.load_quantized(directory, scheme, "cpu")


def load_eager_int8(directory=DEMO_MODEL_DIR):
    """int8 on the CPU as `load("int8")` gives it, without compiling its linears (torchao's eager kernels)."""
    model = AutoModelForImageTextToText.from_pretrained(
        directory, trust_remote_code=True, **quant.load_kwargs("int8", "cpu")
    )
    return quant.finish_loading(model, "int8", "cpu", compile_linears=False).eval()


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int4"])
def test_quantized_demo_model_answers_like_fp32(scheme, fp32_model, processor, questions):
    model = load(scheme)
    decoder_weight = model.model.language_model.layers[0].mlp.fc1.weight
    assert type(decoder_weight).__module__.startswith("torchao"), type(decoder_weight)
    for name in quant.MODULES_TO_NOT_CONVERT:  # kept as plain tensors in the checkpoint's dtype
        module = model.get_submodule(name)
        assert all(type(p) is torch.nn.Parameter for p in module.parameters()), name
    if scheme in ("int8", "int4"):  # bfloat16 for the int4 / packed int8 kernels, the image path back in fp32
        assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
        for name in quant.CPU_FP32_MODULES:
            assert {p.dtype for p in model.get_submodule(name).parameters()} == {torch.float32}, name
    compiled = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m._compiled_call_impl is not None]
    assert len(compiled) == (len(model.model.language_model.layers) * 6 if scheme == "int8" else 0)
    reference, reference_answers = logits_and_answers(fp32_model, processor, questions)
    quantized, answers = logits_and_answers(model, processor, questions)
    deviation = (quantized - reference).abs().max() / reference.abs().max()
    assert deviation < MAX_RELATIVE_DEVIATION[scheme], deviation
    assert deviation > 0  # the weights really changed
    assert answers == reference_answers


def test_int8_saves_and_reloads_quantized(tmp_path, processor, questions):
    # Eager on both sides: compiled graphs are shared between models and differ in bfloat16 rounding from call to call.
    model = load_eager_int8()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    quant.finish_loading(reloaded, "int8", "cpu", compile_linears=False)  # the image path back in fp32
    weight = reloaded.model.language_model.layers[1].self_attn.q_proj.weight
    original = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert type(weight) is type(original)
    assert torch.equal(weight.qdata, original.qdata) and torch.equal(weight.scale, original.scale)
    before, answers_before = logits_and_answers(model, processor, questions[:2])
    after, answers_after = logits_and_answers(reloaded, processor, questions[:2])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # the same weights; kernels may reorder sums
    assert answers_before == answers_after


def test_int8_compiled_linears_equal_eager_int8(processor, questions):
    # The same bfloat16 int8 model with and without its compiled linears: inductor's packed int8 kernel computes what
    # torchao's eager path does, up to the order of the sums and bfloat16 rounding.
    compiled = load("int8")
    eager = load_eager_int8()
    assert not any(module._compiled_call_impl is not None for module in eager.modules())
    compiled_logits, compiled_answers = logits_and_answers(compiled, processor, questions)
    eager_logits, eager_answers = logits_and_answers(eager, processor, questions)
    deviation = (compiled_logits - eager_logits).abs().max() / eager_logits.abs().max()
    assert deviation < 0.01, deviation
    assert compiled_answers == eager_answers


def test_int8_without_a_cpp_compiler_stays_eager_and_says_so(monkeypatch, caplog):
    from transformers.utils import logging

    monkeypatch.setattr(quant.shutil, "which", lambda name: None)
    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True, dtype=torch.float32)
    logger = logging.get_logger("flashsloth.quant")
    logger.addHandler(caplog.handler)
    try:
        assert quant.compile_quantized_linears(model) == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert "needs a C++ compiler" in caplog.text and "--quantize int4" in caplog.text


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_keeps_no_view_of_the_checkpoint_file(scheme, tmp_path):
    # From a bf16 checkpoint, the tensors left in bf16 would stay views of the memory-mapped file, which keeps the whole
    # file resident; finish_loading copies them out, so the file is no longer mapped once loading is done.
    import gc

    bf16 = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    del bf16
    model = load(scheme, tmp_path)
    gc.collect()
    checkpoint = str(tmp_path / "model.safetensors")
    with open("/proc/self/maps") as maps:
        assert checkpoint not in maps.read()
    assert model.lm_head.weight.dtype == torch.bfloat16  # left in the checkpoint's dtype, copied


def test_int4_cpu_format_cannot_be_saved_and_says_so(tmp_path):
    # torchao's CPU int4 layout (Int4OpaqueTensor) has no safetensors form: quantize at load time instead.
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        load("int4").save_pretrained(tmp_path)


def test_cli_choices_are_the_schemes():
    assert QUANTIZE_CHOICES == tuple(quant.SCHEMES)


def test_unknown_scheme_names_the_choices():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'.*int8.*int4"):
        quant.quantization_config("int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where no CUDA GPU is available")
@pytest.mark.parametrize("scheme", ["bnb-8bit", "bnb-4bit"])
def test_bitsandbytes_without_cuda_says_what_to_choose(scheme):
    with pytest.raises(quant.QuantizationUnavailableError, match="CUDA GPU only.*--quantize int8 or int4"):
        quant.quantization_config(scheme, "cpu")
    with pytest.raises(quant.QuantizationUnavailableError, match="CUDA"):
        quant.quantization_config(scheme, "cuda")


def test_missing_torchao_says_what_to_install(monkeypatch):
    real_find_spec = quant.importlib.util.find_spec
    monkeypatch.setattr(
        quant.importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a)
    )
    with pytest.raises(quant.QuantizationUnavailableError, match=r"needs torchao.*pip install -e \"\.\[quant\]\""):
        quant.quantization_config("int8")


def test_int4_without_the_cpu_kernel_says_what_to_choose(monkeypatch):
    monkeypatch.setattr(quant, "has_int4_cpu_kernel", lambda: False)
    with pytest.raises(quant.QuantizationUnavailableError, match="int4 CPU kernel.*choose --quantize int8"):
        quant.quantization_config("int4", "cpu")
    with pytest.raises(quant.QuantizationUnavailableError, match="CPU and CUDA, not for 'mps'"):
        quant.quantization_config("int4", "mps")


def test_configs_keep_the_small_modules_unquantized():
    config = quant.quantization_config("int8", "cpu")
    assert set(config.modules_to_not_convert) == {*quant.MODULES_TO_NOT_CONVERT, *quant.CPU_FP32_MODULES}
    assert quant.quantization_config("int8-dynamic", "cpu").modules_to_not_convert == list(quant.MODULES_TO_NOT_CONVERT)
    config = quant.quantization_config("int4", "cpu")
    assert set(config.modules_to_not_convert) == {*quant.MODULES_TO_NOT_CONVERT, *quant.CPU_FP32_MODULES}
    assert type(config.quant_type).__name__ == "PrototypeInt4WeightOnlyConfig"
    assert config.quant_type.group_size == quant.INT4_GROUP_SIZE
    assert quant.load_kwargs("int4")["dtype"] == torch.bfloat16
    assert quant.load_kwargs("int8")["dtype"] == torch.bfloat16  # the packed int8 kernel's activations
    assert quant.load_kwargs("int8-dynamic", dtype=torch.float32)["dtype"] == torch.float32


def test_quantized_weights_are_a_quarter_of_fp32():
    from flashsloth.quant.worker import decode_weight_bytes, tensor_bytes

    def layer_bytes(model):
        return sum(tensor_bytes(parameter) for parameter in model.model.language_model.layers.parameters())

    fp32 = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True, dtype=torch.float32)
    int8 = load("int8")
    ratio = layer_bytes(int8) / layer_bytes(fp32)
    assert 0.25 < ratio < 0.3, ratio  # int8 values plus one fp32 scale per output channel, fp32 norms and biases
    assert decode_weight_bytes(int8) < decode_weight_bytes(fp32)


def test_cli_ask_quantize_prints_the_fp32_answer(capsys, tmp_path, questions):
    _, image, question = questions[1]
    image.save(tmp_path / "scene.png")
    answers = {}
    for option in ([], ["--quantize", "int8"], ["--quantize", "int4"]):
        code = main(["ask", str(tmp_path / "scene.png"), "--question", question, "--max-new-tokens", "6", *option])
        assert code == 0
        answers[" ".join(option) or "fp32"] = capsys.readouterr().out
    assert answers["fp32"].strip()
    assert answers["--quantize int8"] == answers["fp32"] and answers["--quantize int4"] == answers["fp32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where no CUDA GPU is available")
def test_cli_bitsandbytes_without_cuda_is_a_one_line_usage_error(capsys, tmp_path, questions):
    questions[0][1].save(tmp_path / "scene.png")
    code = main(["ask", str(tmp_path / "scene.png"), "--question", "What?", "--quantize", "bnb-4bit"])
    assert code == 2
    error = capsys.readouterr().err
    assert "CUDA GPU only" in error and "--quantize int8 or int4" in error and len(error.strip().splitlines()) == 1


def test_quant_bench_refuses_bad_requests_before_any_work(capsys):
    from flashsloth.quant.bench import parse_formats

    assert parse_formats("int4,fp32,int8") == ["fp32", "int4", "int8"]  # fp32 first: the reference of the deviations
    with pytest.raises(ValueError, match="unknown fp16; choose from fp32, bf16"):
        parse_formats("fp16")
    assert main(["quant-bench", "--formats", "fp16"]) == 2
    assert main(["quant-bench", "--resume"]) == 2
    error = capsys.readouterr().err
    assert "unknown fp16" in error and "--resume needs --workdir" in error


def test_quant_bench_worker_measures_a_format_against_fp32(tmp_path):
    # One worker process pair at the tiny size, from a bf16 checkpoint: the fp32 reference, then int8 compared with it.
    from safetensors import safe_open

    from flashsloth.quant.bench import format_markdown
    from flashsloth.quant.worker import main as worker_main

    checkpoint = tmp_path / "random"
    assert worker_main(["prepare", "--size", "tiny", "--checkpoint", str(checkpoint), "--dtype", "bf16"]) == 0
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("lm_head.weight").dtype == torch.bfloat16
    results = {}
    for scheme in ("fp32", "int8"):
        output = tmp_path / f"{scheme}.json"
        arguments = ["measure", "--size", "tiny", "--checkpoint", str(checkpoint), "--scheme", scheme, "--warmup"]
        arguments += ["--new-tokens", "3", "--logits-dir", str(tmp_path), "--output", str(output)]
        assert worker_main(arguments) == 0
        results[scheme] = json.loads(output.read_text())
    for name in ("flashsloth", "peer"):
        int8 = results["int8"]["models"][name]
        assert len(int8["tokens"]) == 3 and int8["ttft_s"] > 0 and int8["decode_s"] > 0
        assert int8["warmup_response_s"] > 0
        assert 0 < int8["logit_max_rel"] < MAX_RELATIVE_DEVIATION["int8"] * 3
    assert results["int8"]["decode_weight_bytes"] < results["fp32"]["decode_weight_bytes"]
    report = {"results": list(results.values()), "goals": {"decode_ms": 150, "ttft_s": 5, "peak_rss_gb": 4}}
    report.update(threads=2, size="tiny", new_tokens=3, repeats=1, warmup=True, checkpoint_dtype="bf16")
    report.update(loadavg_start=(0.0,), loadavg_end=(0.0,), bandwidth_gbs=15.5)
    for result in report["results"]:
        result["decode_limit_ms"] = result["decode_weight_bytes"] / 15.5e6
    markdown = format_markdown(report)
    assert "after a 2-token warm-up call, from a bf16 checkpoint" in markdown and "| first call s |" in markdown
    first_call = results["int8"]["models"]["flashsloth"]["warmup_response_s"]
    assert f"| int8 | FlashSloth | {results['int8']['models']['flashsloth']['prompt_tokens']} |" in markdown
    assert f"| {first_call:.2f} |" in markdown


def test_kernel_timings_compute_the_fp32_product():
    # Every timed path of `quant-bench --kernels` on a small matrix: the same product as fp32 within its format's error.
    from flashsloth.quant.kernels import format_kernels, time_kernels

    report = time_kernels(rows=(1, 3), repeats=1, shape=(64, 256))
    deviations = {(r["path"], r["rows"]): r["max_rel"] for r in report["results"]}
    assert len(deviations) == 10 and all(r["ms"] > 0 for r in report["results"])
    assert deviations[("fp32", 1)] == 0
    for (path, _), deviation in deviations.items():
        assert deviation < (0.2 if path.startswith("int4") else 0.02), (path, deviation)
        assert path == "fp32" or deviation > 0
    table = format_kernels(report)
    assert "| int8 compiled (packed kernel) |" in table and "decode floor ms" in table
