"""Static cache and a compiled decoding step on the parity fixtures' models: the same tokens as the dynamic cache and
as the original research code.

The decoding step is captured whole by `torch.compile(fullgraph=True)` (any graph break fails). CI compiles with
dynamo's "eager" backend, which checks the capture without generating C++ (the inductor backend gives the same
tokens too, in about 80 s per model on 2 CPU cores).
"""

import pytest
import torch
from transformers import CompileConfig

from flashsloth import FlashSlothForConditionalGeneration
from flashsloth.conversion.original_layout import convert_original_state_dict, flashsloth_config_from_original
from parity_helpers import ParityFixture, regenerate_original_state_dict


@pytest.mark.parametrize("variant", ["base", "hd"])
def test_static_cache_with_compiled_decoding_equals_dynamic_cache(variant):
    fixture = ParityFixture(variant)
    config = flashsloth_config_from_original(fixture.original_config, fixture.vision_config)
    model = FlashSlothForConditionalGeneration(config).eval()
    model.load_state_dict(convert_original_state_dict(regenerate_original_state_dict(fixture.dir)), strict=True)
    inputs = fixture.expanded_inputs()
    expected = fixture.tensors["generated_ids"]
    steps = expected.shape[1]
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate() compiles on its own only on accelerators

    torch._dynamo.reset()
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        static = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            cache_implementation="static",
            compile_config=compile_config,
        )
    assert hasattr(model, "_compiled_call"), "the decoding step was not compiled"
    assert static.tolist() == dynamic.tolist()
    assert static[:, inputs["input_ids"].shape[1] :].tolist() == expected.tolist()
