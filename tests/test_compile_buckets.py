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
    samples = [
        make_sample([(1, crops, text_length, True)], seed=text_length)
        for crops, text_length in ((1, 3), (1, 6), (5, 9))
    ]
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


def test_cli_compile_pads_to_a_bucket_and_compiles_the_whole_prefill(capsys):
    """`flashsloth ask --compile`: the prompt left-padded to a multiple of PREFILL_BUCKET, one prefill chunk, and the
    answer of the uncompiled command (dynamo's eager backend here: inductor would only add compile time)."""
    import random

    from flashsloth.cli import PREFILL_BUCKET, Assistant, build_parser, user_message
    from flashsloth.training import synthetic

    rng = random.Random(11)
    scene, record = synthetic.make_sample(0, 2, rng, kinds=("color",))
    image = synthetic.render_scene(scene, 144, rng)
    messages = [user_message(record["conversations"][0]["value"].replace("<image>\n", ""), 1)]
    plain = Assistant(build_parser().parse_args(["ask", "x.png", "--question", "q", "--max-new-tokens", "4"]))
    compiled = Assistant(
        build_parser().parse_args(["ask", "x.png", "--question", "q", "--max-new-tokens", "4", "--compile"])
    )
    compiled.generate_kwargs["compile_config"].backend = "eager"
    calls = []
    generate = compiled.model.generate

    def recording_generate(**kwargs):
        calls.append({name: kwargs[name] for name in ("input_ids", "prefill_chunk_size")})
        return generate(**kwargs)

    compiled.model.generate = recording_generate
    expected = plain.answer(messages, [image])
    assert compiled.answer(messages, [image]) == expected == record["conversations"][1]["value"]
    (call,) = calls
    length = call["input_ids"].shape[1]
    assert length % PREFILL_BUCKET == 0 and call["prefill_chunk_size"] == length
    assert capsys.readouterr().out.split() == [expected, expected]
