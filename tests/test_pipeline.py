"""The `image-text-to-text` pipeline on a tiny saved FlashSloth checkpoint loaded as remote code."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from model_helpers import save_tiny_checkpoint
from processing_helpers import make_tiny_processor


MAX_NEW_TOKENS = 6


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chat(text: str, images=()) -> list[dict]:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    processor = make_tiny_processor(image_size=84, num_image_tokens_per_crop=4)
    model = save_tiny_checkpoint(directory, processor)
    return directory, model, processor


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return pipeline("image-text-to-text", model=str(checkpoint[0]), trust_remote_code=True)


def reference_answer(checkpoint, messages, **generate_kwargs) -> str:
    """What `model.generate` answers to one conversation alone (greedy unless told otherwise)."""
    _, model, processor = checkpoint
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [item["image"] for message in messages for item in message["content"] if item["type"] == "image"]
    inputs = processor(images=images or None, text=prompt)
    with torch.no_grad():
        output_ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, **generate_kwargs)
    return processor.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_pipeline_loads_the_remote_code_model_and_processor(pipe):
    assert type(pipe.model).__module__.startswith("transformers_modules.")
    assert type(pipe.processor).__name__ == "FlashSlothProcessor"
    assert pipe.model.generation_config.suppress_tokens == [pipe.processor.image_token_id, pipe.processor.query_token_id]


def test_chat_messages(pipe, checkpoint):
    messages = chat("What is in the picture?", [noise_image(70, 50)])
    (result,) = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)
    assert result["input_text"] == messages
    assert result["generated_text"][:-1] == messages
    reply = result["generated_text"][-1]
    assert reply["role"] == "assistant"
    assert reply["content"] == reference_answer(checkpoint, messages)


def test_return_full_text_false_returns_only_the_answer(pipe, checkpoint):
    messages = chat("Describe it.", [noise_image(40, 40)])
    (result,) = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert result["generated_text"] == reference_answer(checkpoint, messages)


def test_plain_prompt_with_images(pipe, checkpoint):
    _, _, processor = checkpoint
    image = noise_image(64, 32)
    messages = chat("What is this?", [image])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    (result,) = pipe(images=[image], text=prompt, max_new_tokens=MAX_NEW_TOKENS)
    assert result["input_text"] == prompt
    assert result["generated_text"] == prompt + reference_answer(checkpoint, messages)
    (answer_only,) = pipe(images=[image], text=prompt, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert answer_only["generated_text"] == reference_answer(checkpoint, messages)


def test_image_file_paths(pipe, checkpoint, tmp_path):
    image = noise_image(90, 30)
    image.save(tmp_path / "image.png")
    answer = reference_answer(checkpoint, chat("What is this?", [image]))
    (from_chat,) = pipe(
        text=chat("What is this?", [str(tmp_path / "image.png")]), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False
    )
    assert from_chat["generated_text"] == answer
    path_item = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "image.png")}, {"type": "text", "text": "What is this?"}]}]
    (from_path_key,) = pipe(text=path_item, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert from_path_key["generated_text"] == answer


def test_generate_kwargs_reach_generate(pipe, checkpoint):
    messages = chat("What is in the picture?", [noise_image(70, 50)])
    kwargs = {"do_sample": True, "temperature": 3.0, "top_k": 0}
    torch.manual_seed(0)
    (result,) = pipe(
        text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False, generate_kwargs=dict(kwargs)
    )
    torch.manual_seed(0)
    assert result["generated_text"] == reference_answer(checkpoint, messages, **kwargs)
    assert result["generated_text"] != reference_answer(checkpoint, messages)


def test_static_cache_switch_through_the_pipeline_compiles_the_whole_prefill(pipe, checkpoint):
    """The fast-generation switch from a pipeline: a static cache, and compiling asked for on this CPU too (on CUDA
    transformers compiles by itself). The prefill goes through the compiled forward, as one chunk; same answer."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = CompileConfig(fullgraph=True, backend=backend, dynamic=False, mode=None)
    compile_config._compile_all_devices = True
    messages = chat("What is in the picture?", [noise_image(70, 50)])
    (result,) = pipe(
        text=messages,
        max_new_tokens=MAX_NEW_TOKENS,
        return_full_text=False,
        generate_kwargs={"cache_implementation": "static", "compile_config": compile_config},
    )
    assert result["generated_text"] == reference_answer(checkpoint, messages)
    assert len(graphs) == 2, "expected one compiled prefill graph and one decoding-step graph"


def test_batched_mixed_requests_equal_each_request_alone(pipe, checkpoint):
    requests = [
        chat("What is in the picture?", [noise_image(70, 50, seed=1)]),
        chat("Compare the two pictures in a few words, please.", [noise_image(30, 90, seed=2), noise_image(84, 84, seed=3)]),
        chat("Hello, who are you?"),
        chat("Colour?", [noise_image(200, 20, seed=4)]),
        chat("Which one is larger?", [noise_image(10, 10, seed=5), noise_image(300, 120, seed=6)]),
        chat("How many cats are there on the sofa in this picture?", [noise_image(45, 60, seed=7)]),
        chat("Is it day or night?", [noise_image(128, 96, seed=8)]),
        chat("Describe both.", [noise_image(50, 150, seed=9), noise_image(150, 50, seed=10)]),
    ]
    results = pipe(text=requests, batch_size=4, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert [result["generated_text"] for (result,) in results] == [
        reference_answer(checkpoint, request) for request in requests
    ]


def test_url_without_network_fails_with_a_clear_error(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    messages = chat("What is this?", ["http://127.0.0.1:9/unreachable.png"])
    with pytest.raises(ValueError, match="Could not read the image 'http://127.0.0.1:9/unreachable.png'"):
        pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)
