"""FlashSloth on a CUDA device: the same answers as on the CPU, in every attention backend and cache mode that runs
there. Skipped where torch sees no CUDA device (the CI machine has none); on a GPU machine: `pytest tests/test_cuda.py`
(tests/test_benchmark.py then also runs the benchmark on the GPU)."""

import copy

import pytest
import torch
from transformers import CompileConfig
from transformers.utils import is_flash_attn_2_available

from model_helpers import MIXED_SAMPLES as SAMPLES, collate, make_sample, tiny_model


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """TF32 would round float32 matmuls to 10 mantissa bits on the GPU; the comparisons below mean float32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def to_device(batch: dict, device, dtype=None) -> dict:
    return {
        name: value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
        for name, value in batch.items()
    }


def greedy(model, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return output[:, batch["input_ids"].shape[1] :].cpu()


@pytest.fixture(scope="module")
def batch():
    return collate([make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)])


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_float32_logits_on_cuda_equal_the_cpu(batch, attn_implementation):
    cpu_model = tiny_model(attn_implementation=attn_implementation)
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    real_tokens = batch["attention_mask"].bool()  # padding rows attend to nothing: backends fill them differently
    with torch.no_grad():
        expected = cpu_model(**batch).logits[real_tokens]
        logits = cuda_model(**to_device(batch, "cuda")).logits.cpu()[real_tokens]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_bfloat16_logits_stay_close_to_float32(batch, attn_implementation):
    reference = tiny_model(attn_implementation=attn_implementation).to("cuda")
    half = copy.deepcopy(reference).to(torch.bfloat16)
    real_tokens = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**to_device(batch, "cuda")).logits[real_tokens.cuda()].double()
        logits = half(**to_device(batch, "cuda", torch.bfloat16)).logits[real_tokens.cuda()].double()
    relative_error = (logits - expected).norm() / expected.norm()
    assert torch.isfinite(logits).all()
    assert relative_error < 2e-2, f"bfloat16 logits are {relative_error:.2e} away from float32 (relative norm)"


def test_batched_generation_on_cuda_equals_each_sample_alone():
    model = tiny_model().to("cuda")
    samples = [make_sample(turns, seed=index) for index, turns in enumerate(SAMPLES)]
    batched = greedy(model, to_device(collate(samples), "cuda"))
    for index, sample in enumerate(samples):
        alone = greedy(model, to_device(collate([sample]), "cuda"))
        assert batched[index].tolist() == alone[0].tolist()


def test_cuda_generation_equals_the_cpu(batch):
    cpu_model = tiny_model()
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    assert greedy(cuda_model, to_device(batch, "cuda")).tolist() == greedy(cpu_model, batch).tolist()


@pytest.mark.parametrize("compiled_prefill", [False, True], ids=["decoding", "prefill-and-decoding"])
def test_static_cache_with_cuda_graphs_equals_the_dynamic_cache(batch, compiled_prefill):
    """The `flashsloth bench --compile` path on a GPU: static cache, the decoding step (and with a prefill chunk as long
    as the prompt, the prefill) compiled in reduce-overhead mode. CUDA graphs replay them, so any host synchronisation
    or shape change inside would break or fall back."""
    torch._dynamo.reset()
    model = tiny_model().to("cuda")
    cuda_batch = to_device(batch, "cuda")
    dynamic = greedy(model, cuda_batch)
    compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead", dynamic=False)
    prefill = {"prefill_chunk_size": cuda_batch["input_ids"].shape[1]} if compiled_prefill else {}
    for _ in range(2):  # the second call replays the recorded graphs
        static = greedy(model, cuda_batch, cache_implementation="static", compile_config=compile_config, **prefill)
        assert static.tolist() == dynamic.tolist()
    assert hasattr(model, "_compiled_call"), "generate did not compile the decoding step"


@pytest.mark.parametrize("compiled_prefill", [False, True], ids=["decoding", "static-cache-switch"])
def test_static_cache_alone_compiles_the_whole_prefill_on_cuda(batch, compiled_prefill):
    """`cache_implementation="static"` is the one switch: transformers compiles the decoding step on CUDA by itself,
    and FlashSloth's `generate` makes the prompt one prefill chunk, so the prefill runs compiled too."""
    torch._dynamo.reset()
    model = tiny_model().to("cuda")
    cuda_batch = to_device(batch, "cuda")
    dynamic = greedy(model, cuda_batch)
    for _ in range(2):
        static = greedy(model, cuda_batch, cache_implementation="static")
        assert static.tolist() == dynamic.tolist()
    assert hasattr(model, "_compiled_call"), "generate did not compile on CUDA with a static cache"


def test_ask_compiles_by_default_on_cuda_and_answers_as_without(tmp_path):
    """`flashsloth ask` on CUDA: compiled (static cache, CUDA graphs) unless --no-compile, with the same answer."""
    import subprocess
    import sys

    from PIL import Image, ImageDraw

    from flashsloth.demo import DEMO_MODEL_DIR

    image = Image.new("RGB", (144, 144), (220, 220, 220))
    ImageDraw.Draw(image).ellipse((20, 50, 60, 90), fill=(220, 30, 30))
    image.save(tmp_path / "circle.png")
    answers = []
    for flag in ([], ["--no-compile"]):
        command = [sys.executable, "-m", "flashsloth", "ask", "--model", str(DEMO_MODEL_DIR), "--device", "cuda",
                   str(tmp_path / "circle.png"), "--question", "How many shapes are there?", "--max-new-tokens", "4", *flag]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        answers.append(result.stdout)
    assert answers[0] == answers[1]


@pytest.mark.skipif(not is_flash_attn_2_available(), reason="needs the flash-attn package")
def test_flash_attention_2_logits_equal_sdpa(batch):
    sdpa = tiny_model(attn_implementation="sdpa").to("cuda", torch.bfloat16)
    flash = tiny_model(attn_implementation="flash_attention_2").to("cuda", torch.bfloat16)
    cuda_batch = to_device(batch, "cuda", torch.bfloat16)
    real_tokens = batch["attention_mask"].bool().cuda()
    with torch.no_grad():
        expected = sdpa(**cuda_batch).logits[real_tokens].float()
        logits = flash(**cuda_batch).logits[real_tokens].float()
    assert ((logits - expected).norm() / expected.norm()) < 1e-2
    assert greedy(flash, cuda_batch).shape == (len(SAMPLES), NEW_TOKENS)
