"""Compiled generation with prompts left-padded to a length bucket: one prefill graph and one decoding-step graph
serve every prompt of the bucket (no recompilation, no graph break), and the answers equal eager generation of each
prompt unpadded. This is what replays as CUDA graphs on a GPU (`CompileConfig(mode="reduce-overhead")`)."""

import pytest
import torch
from transformers import CompileConfig

from model_helpers import PAD_TOKEN_ID, collate, make_sample, tiny_model


BUCKET = 48
NEW_TOKENS = 5


def padded_to_bucket(sample: dict) -> dict:
    """One sample as a batch, left-padded to `BUCKET` tokens (what `processor(..., pad_to_multiple_of=BUCKET)` gives)."""
    batch = collate([sample])
    padding = BUCKET - batch["input_ids"].shape[1]
    assert padding > 0
    pad = lambda tensor, value: torch.nn.functional.pad(tensor, (padding, 0), value=value)  # noqa: E731
    return {
        **batch,
        "input_ids": pad(batch["input_ids"], PAD_TOKEN_ID),
        "attention_mask": pad(batch["attention_mask"], 0),
        "instruction_mask": pad(batch["instruction_mask"], 0),
    }


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_prompts_of_one_bucket_share_the_compiled_graphs(model):
    torch._dynamo.reset()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(len(example_inputs))
        return graph_module.forward

    compile_config = CompileConfig(fullgraph=True, backend=backend, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
    # Three prompts of different lengths (one image each, 3, 6 and 9 instruction tokens), one with HD crops.
    samples = [make_sample([(1, crops, text_length, True)], seed=text_length) for crops, text_length in ((1, 3), (1, 6), (5, 9))]
    lengths = {len(sample["input_ids"]) for sample in samples}
    assert len(lengths) == 3 and max(lengths) < BUCKET
    compiled = tiny_model()
    with torch.no_grad():
        for sample in samples:
            reference = model.generate(**collate([sample]), max_new_tokens=NEW_TOKENS, do_sample=False)
            inputs = padded_to_bucket(sample)
            output = compiled.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                cache_implementation="static",
                compile_config=compile_config,
                prefill_chunk_size=BUCKET,
            )
            assert output[0, BUCKET:].tolist() == reference[0, -NEW_TOKENS:].tolist()
    # The HD prompt has 5 crops instead of 1: a different pixel shape, so its prefill is a graph of its own. The
    # two single-crop prompts share one prefill graph, and every prompt shares the decoding step's.
    assert len(graphs) == 3, f"{len(graphs)} graphs compiled for 3 prompts of one bucket"
