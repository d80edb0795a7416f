"""`generate()` on a tiny random FlashSloth with real processor inputs: decoding strategies, streaming, stopping,
placeholder suppression, multi-turn chats, the static cache and a compiled decode step."""

import copy
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CompileConfig, TextIteratorStreamer

from model_helpers import tiny_generation_config, tiny_model_for_processor
from processing_helpers import make_tiny_processor


MAX_NEW_TOKENS = 6


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def user_turn(text: str, num_images: int = 1) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def processor():
    return make_tiny_processor(image_size=84, num_image_tokens_per_crop=4)


@pytest.fixture(scope="module")
def model(processor):
    model = tiny_model_for_processor(processor)
    model.generation_config = tiny_generation_config(processor, max_new_tokens=MAX_NEW_TOKENS)
    return model


@pytest.fixture(scope="module")
def inputs(processor):
    prompt = processor.apply_chat_template([user_turn("What is in the picture?")], add_generation_prompt=True)
    return processor(images=[noise_image(70, 50)], text=prompt)


def new_tokens(output_ids: torch.Tensor, inputs) -> torch.Tensor:
    return output_ids[:, inputs["input_ids"].shape[1] :]


def greedy(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return new_tokens(model.generate(**inputs, do_sample=False, **kwargs), inputs)


def sample(model, inputs, seed: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return new_tokens(model.generate(**inputs, do_sample=True, **kwargs), inputs)


def test_greedy_equals_an_argmax_loop_over_full_forward_passes(model, inputs):
    generated = greedy(model, inputs)
    assert generated.shape == (1, MAX_NEW_TOKENS)  # the random model does not stop early on this prompt

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    suppressed = model.generation_config.suppress_tokens
    expected = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=inputs["pixel_values"],
                image_num_crops=inputs["image_num_crops"],
                instruction_mask=inputs["instruction_mask"],
                use_cache=False,
            ).logits[:, -1]
            logits[:, suppressed] = -float("inf")
            next_token = logits.argmax(dim=-1, keepdim=True)
            expected.append(next_token.item())
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    assert generated[0].tolist() == expected


def test_uncached_generation_equals_cached(model, inputs):
    assert torch.equal(greedy(model, inputs, use_cache=False), greedy(model, inputs))


def test_sampling_with_a_fixed_seed_is_reproducible(model, inputs):
    first = sample(model, inputs, seed=3, temperature=1.5)
    assert torch.equal(sample(model, inputs, seed=3, temperature=1.5), first)


def test_sampling_settings_that_leave_one_candidate_equal_greedy(model, inputs):
    expected = greedy(model, inputs)
    for seed in range(3):
        assert torch.equal(sample(model, inputs, seed, top_k=1), expected)
        assert torch.equal(sample(model, inputs, seed, temperature=1e-4), expected)
        assert torch.equal(sample(model, inputs, seed, top_p=1e-6, top_k=0), expected)


def first_step_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    logits[model.generation_config.suppress_tokens] = -float("inf")
    return logits


def sampled_first_tokens(model, inputs, **kwargs) -> set[int]:
    """First generated token of 64 samples (one generate call, 64 return sequences)."""
    tokens = sample(model, inputs, seed=0, max_new_tokens=1, num_return_sequences=64, **kwargs)
    return set(tokens[:, 0].tolist())


def test_temperature_spreads_the_samples(model, inputs):
    top_2 = first_step_logits(model, inputs).topk(2)
    # Cold enough that the runner-up is e^-40 times less likely than the best token (random logits are close).
    cold_temperature = float(top_2.values[0] - top_2.values[1]) / 40
    cold = sampled_first_tokens(model, inputs, temperature=cold_temperature, top_k=0)
    hot = sampled_first_tokens(model, inputs, temperature=20.0, top_k=0)
    assert cold == {int(top_2.indices[0])}
    assert len(hot) > 10


def test_samples_stay_inside_top_k_and_top_p(model, inputs):
    logits = first_step_logits(model, inputs)
    top_5 = set(logits.topk(5).indices.tolist())
    assert sampled_first_tokens(model, inputs, temperature=50.0, top_k=5) == top_5

    probabilities = logits.softmax(dim=-1)
    ranked = probabilities.sort(descending=True)
    # The smallest set of most likely tokens whose probability reaches top_p (here: the first three).
    top_p = float(ranked.values[:3].sum()) - 1e-4
    nucleus = set(ranked.indices[:3].tolist())
    sampled = sampled_first_tokens(model, inputs, top_p=top_p, top_k=0)
    assert sampled <= nucleus and len(sampled) > 1


def test_high_temperature_samples_differ_across_seeds(model, inputs):
    samples = {tuple(sample(model, inputs, seed, temperature=5.0, top_k=0)[0].tolist()) for seed in range(4)}
    assert len(samples) > 1


def test_beam_search_returns_the_requested_sequences(model, inputs):
    with torch.no_grad():
        output = model.generate(
            **inputs, num_beams=4, num_return_sequences=3, return_dict_in_generate=True, output_scores=True
        )
    assert output.sequences.shape[0] == 3
    scores = output.sequences_scores.tolist()
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(row.tolist()) for row in output.sequences}) == 3


def test_multiple_return_sequences_see_their_own_crops(model, processor):
    # Expanding a prompt into several sequences (sampling or beams) must give every copy the prompt's crops in
    # order (here two images; an HD image alone has 5 crops), not each crop repeated in place.
    prompt = processor.apply_chat_template([user_turn("Compare them.", num_images=2)], add_generation_prompt=True)
    inputs = processor(images=[noise_image(60, 40, seed=1), noise_image(30, 90, seed=2)], text=prompt)
    input_ids, expanded = model._expand_inputs_for_generation(expand_size=2, **inputs)
    with torch.no_grad():
        expected = model(**inputs).logits
        logits = model(input_ids=input_ids, **expanded).logits
    torch.testing.assert_close(logits, expected.expand_as(logits), rtol=0, atol=1e-5)


def test_streamer_yields_the_decoded_answer(model, processor, inputs):
    expected = processor.decode(greedy(model, inputs)[0], skip_special_tokens=True)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(target=model.generate, kwargs={**inputs, "streamer": streamer})
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert len(chunks) >= 1
    assert "".join(chunks) == expected


def test_generation_stops_at_eos(model, inputs):
    tokens = greedy(model, inputs)[0].tolist()
    stop_token = tokens[2]
    stopped = greedy(model, inputs, eos_token_id=stop_token)[0].tolist()
    assert stopped == tokens[: tokens.index(stop_token) + 1]


def test_placeholders_are_never_generated_even_when_forced(model, processor, inputs):
    forced = copy.deepcopy(model)
    with torch.no_grad():
        forced.lm_head.bias[processor.image_token_id] += 1e4
        forced.lm_head.bias[processor.query_token_id] += 1e4
        assert forced(**inputs).logits[0, -1].argmax() in (processor.image_token_id, processor.query_token_id)
    placeholders = {processor.image_token_id, processor.query_token_id}
    for generated in (
        greedy(forced, inputs),
        greedy(forced, inputs, use_cache=False),  # re-runs the vision path on every step
        sample(forced, inputs, seed=0, temperature=2.0, num_return_sequences=4),
        new_tokens(forced.generate(**inputs, num_beams=3), inputs),
    ):
        assert not placeholders & set(generated.flatten().tolist())


def test_multi_turn_conversation(model, processor):
    image = noise_image(64, 48)
    conversation = [user_turn("What is in the picture?")]
    first_inputs = processor(
        images=[image], text=processor.apply_chat_template(conversation, add_generation_prompt=True)
    )
    answer = processor.decode(greedy(model, first_inputs)[0], skip_special_tokens=True)
    conversation += [
        {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
        {"role": "user", "content": [{"type": "text", "text": "And what colour is it?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    second_inputs = processor(images=[image], text=prompt)

    num_query_tokens = (second_inputs["input_ids"] == processor.query_token_id).sum()
    assert num_query_tokens == 2 * processor.num_query_tokens
    assert set(second_inputs["instruction_mask"].unique().tolist()) == {0, 1, 2}
    second_answer = greedy(model, second_inputs)
    assert second_answer.shape[1] >= 1
    # The second turn changes what the model reads: the answer is conditioned on the whole conversation.
    with torch.no_grad():
        first_logits = model(**first_inputs).logits[0, -1]
        second_logits = model(**second_inputs).logits[0, -1]
    assert not torch.allclose(first_logits, second_logits)


def compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend, dynamic=False)
    config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
    return config


def test_static_cache_with_a_compiled_decode_step_equals_the_dynamic_cache(model, processor):
    torch._dynamo.reset()
    prompts = [
        processor.apply_chat_template([user_turn("What is in the picture?")], add_generation_prompt=True),
        processor.apply_chat_template([user_turn("Hi")], add_generation_prompt=True),
    ]
    batch = processor(images=[noise_image(70, 50), noise_image(40, 80, seed=1)], text=prompts)
    assert (batch["attention_mask"] == 0).any()  # left padding reaches the 4D static-cache mask
    compiled = copy.deepcopy(model)
    with torch.no_grad():
        dynamic = compiled.generate(**batch, do_sample=False)
        static = compiled.generate(
            **batch,
            do_sample=False,
            cache_implementation="static",
            compile_config=compile_config("eager"),
        )
    assert hasattr(compiled, "_compiled_call"), "the decode step was not compiled"
    assert torch.equal(static, dynamic)
