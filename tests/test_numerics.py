"""Half precision: bf16 and fp16 stay within stated tolerances of fp32 on the parity fixtures' model, Phi-2's fp16
attention overflow is handled, and extreme but valid inputs give finite outputs in every dtype (CPU)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import PhiModel

from flashsloth import FlashSlothForConditionalGeneration
from flashsloth.conversion.original_layout import convert_original_state_dict, flashsloth_config_from_original
from model_helpers import IMAGE_SIZE, tiny_model, tiny_model_for_processor
from parity_helpers import ParityFixture, regenerate_original_state_dict
from processing_helpers import make_tiny_processor


# Largest |difference| to fp32 allowed on the fixture's 17 logits positions (their values reach 1.76) and on the
# projected image tokens: about 4x what was measured (bf16 0.023 / fp16 0.0024 on the logits).
TOLERANCES = {
    torch.bfloat16: {"logits": 0.1, "image_embeds": 0.05},
    torch.float16: {"logits": 0.01, "image_embeds": 0.01},
}


@pytest.fixture(scope="module")
def parity_model():
    fixture = ParityFixture("base")
    config = flashsloth_config_from_original(fixture.original_config, fixture.vision_config)
    model = FlashSlothForConditionalGeneration(config).eval()
    model.load_state_dict(convert_original_state_dict(regenerate_original_state_dict(fixture.dir)), strict=True)
    return fixture, model


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_stays_close_to_fp32_on_the_parity_model(parity_model, dtype):
    fixture, model = parity_model
    inputs = fixture.expanded_inputs()
    positions = fixture.tensors["logits_positions"]
    with torch.no_grad():
        reference = model(**inputs)
        half = FlashSlothForConditionalGeneration(model.config).eval()
        half.load_state_dict(model.state_dict())
        half.to(dtype)
        output = half(**cast(inputs, dtype))
    assert output.logits.dtype == dtype and torch.isfinite(output.logits).all()
    logits_error = (output.logits.float() - reference.logits)[0, positions].abs().max().item()
    image_error = (output.image_hidden_states.float() - reference.image_hidden_states).abs().max().item()
    assert logits_error <= TOLERANCES[dtype]["logits"], logits_error
    assert image_error <= TOLERANCES[dtype]["image_embeds"], image_error


def overflowing_model(attn_implementation: str):
    """A tiny FlashSloth whose decoder queries and keys are large: their dot products (about 1.3e5 per head) overflow
    float16's 65504 unless computed in float32; the scaled scores (about 3.3e4) fit."""
    model = tiny_model(attn_implementation=attn_implementation)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.zero_()
                projection.bias.fill_(90.0)
    return model


def test_fp16_eager_attention_does_not_overflow_where_native_phi_does():
    model = overflowing_model("eager")
    assert model.model.language_model.config._attn_implementation == "eager"  # the float32 scores are no new name
    input_ids = torch.randint(10, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
        # transformers' own Phi eager attention on the same weights, in fp16: inf scores, then NaN.
        native_config = copy.deepcopy(model.model.language_model.config)
        native_config._attn_implementation_internal = "eager"
        native = PhiModel(native_config).eval()
        native.load_state_dict(model.model.language_model.state_dict())
        assert not torch.isfinite(native.half()(input_ids=input_ids).last_hidden_state).all()
        for implementation in ("eager", "sdpa"):
            half = overflowing_model(implementation).half()
            logits = half(input_ids=input_ids).logits
            assert torch.isfinite(logits).all(), implementation
            torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.01)


def test_eager_equals_sdpa_in_bf16():
    inputs = {"input_ids": torch.randint(10, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        eager = tiny_model(attn_implementation="eager").to(torch.bfloat16)(**inputs).logits
        sdpa = tiny_model(attn_implementation="sdpa").to(torch.bfloat16)(**inputs).logits
    torch.testing.assert_close(eager, sdpa, atol=0.03, rtol=0.02)


EXTREME_IMAGES = {
    "all-black": np.zeros((60, 90, 3), np.uint8),
    "all-white": np.full((60, 90, 3), 255, np.uint8),
    "saturated-red": np.broadcast_to(np.array([255, 0, 0], np.uint8), (40, 40, 3)),
    "checkerboard": (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1),
}


@pytest.fixture(scope="module")
def processor():
    return make_tiny_processor(image_size=IMAGE_SIZE, num_image_tokens_per_crop=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_extreme_valid_inputs_give_finite_outputs(processor, dtype):
    model = tiny_model_for_processor(processor).to(dtype)
    prompts = [f"USER: <image>\nDescribe the {name} picture.<learnable> ASSISTANT:" for name in EXTREME_IMAGES]
    images = [Image.fromarray(np.ascontiguousarray(pixels)) for pixels in EXTREME_IMAGES.values()]
    long_prompt = "USER: <image>\n" + "Describe the picture in detail. " * 120 + "<learnable> ASSISTANT:"
    batch = processor(images=images, text=prompts)
    long = processor(images=images[:1], text=long_prompt)
    assert long["input_ids"].shape[1] > 1000
    with torch.no_grad():
        for inputs in (batch, long):
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            output = model.generate(
                **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            assert all(torch.isfinite(step).all() for step in output.logits), dtype
