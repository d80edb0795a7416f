"""
`flashsloth serve` against the real `openai` client: a server process on a free port of 127.0.0.1 serves the demo
model; every answer is compared with the answer of the same request computed here with the processor and
`model.generate`, alone. Also: batching of concurrent requests, seeded sampling, the errors, and a client that leaves.
"""

import base64
import http.client
import io
import json
import random
import threading
import time
import urllib.parse

import numpy as np
import pytest
import torch

from flashsloth.demo import DEMO_MODEL_DIR
from flashsloth.training import synthetic


openai = pytest.importorskip(
    "openai", reason="the serving tests need the openai client: pip install 'flashsloth[test]'"
)
pytest.importorskip("fastapi", reason="flashsloth serve needs FastAPI: pip install 'flashsloth[serve]'")
pytest.importorskip("uvicorn", reason="flashsloth serve needs uvicorn: pip install 'flashsloth[serve]'")
from flashsloth.serve.batching import collate, visible_text  # noqa: E402
from flashsloth.serve.load_test import call, start_server, stop_server  # noqa: E402


MODEL_ID = "flashsloth-demo"
# The demo model answers in one word; banning its end-of-sequence tokens (OpenAI's logit_bias) makes long answers.
EOS_IDS = (0, 449)
BAN_EOS = {str(token): -100 for token in EOS_IDS}
CAP = 64
SERVER_LIMITS = [
    "--max-body-mb",
    "1",
    "--max-images",
    "2",
    "--max-tokens-cap",
    str(CAP),
    "--max-image-pixels",
    str(512 * 512),
]


@pytest.fixture(scope="module")
def server():
    process, url = start_server(str(DEMO_MODEL_DIR), SERVER_LIMITS)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def slow_server():
    """A server whose decoding steps take 60 ms: its requests are still running while a test looks at them."""
    process, url = start_server(str(DEMO_MODEL_DIR), [*SERVER_LIMITS, "--step-delay-ms", "60"])
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True).eval()

    def answer(messages, images, max_new_tokens=CAP, seed=None, ban_eos=False, **sampling):
        """The in-process answer: FlashSloth messages, PIL images; greedy unless sampling settings are given."""
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=images or None, text=prompt, return_tensors="pt")
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = {"do_sample": True, "top_k": 0, **sampling} if sampling else {"do_sample": False}
        if ban_eos:
            kwargs["sequence_bias"] = {(token,): -100.0 for token in EOS_IDS}
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return processor.decode(new_tokens, skip_special_tokens=True).strip(), inputs["input_ids"].shape[1]

    answer.processor = processor
    return answer


def raw_request(url: str, method: str, path: str, payload: bytes | None = None, timeout: float = 30):
    """An open HTTP response (and its connection) for a raw body, e.g. one that is not JSON."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def raw_json(url: str, method: str, path: str, payload: bytes | None = None) -> tuple[int, dict]:
    connection, response = raw_request(url, method, path, payload)
    try:
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def client_for(url: str, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, **kwargs)


def scene(seed: int, size: int = 144):
    rng = random.Random(seed)
    drawn, record = synthetic.make_sample(seed, 2, rng)
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    return synthetic.render_scene(drawn, size, rng), question


def data_url(image, format="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def conversations():
    """(OpenAI messages, FlashSloth messages, images) of several shapes of request."""
    cases = []
    for seed in (1, 2, 3):
        image, question = scene(seed)
        cases.append(
            (
                [{"role": "user", "content": [image_part(image), {"type": "text", "text": question}]}],
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                [image],
            )
        )
    image, _ = scene(4)
    cases.append(
        (
            [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}, image_part(image)]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            [image],
        )
    )
    cases.append(
        (
            [{"role": "user", "content": "How many shapes are there?"}],
            [{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}],
            [],
        )
    )
    first, second = scene(5), scene(6)
    cases.append(
        (
            [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [image_part(first[0]), {"type": "text", "text": first[1]}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": [image_part(second[0]), {"type": "text", "text": second[1]}]},
            ],
            [
                {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first[1]}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": second[1]}]},
            ],
            [first[0], second[0]],
        )
    )
    return cases


def streamed(client, **request):
    chunks = list(client.chat.completions.create(stream=True, model=MODEL_ID, **request))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    return text, finish, chunks


def test_models_and_health(server):
    client = client_for(server)
    assert [model.id for model in client.models.list().data] == [MODEL_ID]
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL_ID


def test_plain_and_streamed_answers_equal_the_in_process_answer(server, reference):
    client = client_for(server)
    for messages, flashsloth_messages, images in conversations():
        expected, prompt_tokens = reference(flashsloth_messages, images)
        response = client.chat.completions.create(model=MODEL_ID, messages=messages)
        assert response.choices[0].message.content == expected
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.prompt_tokens == prompt_tokens
        text, finish, _ = streamed(client, messages=messages)
        assert (text, finish) == (expected, ["stop"])


def test_max_tokens_and_stop(server, reference):
    client = client_for(server)
    image, _ = scene(7)
    messages = [{"role": "user", "content": [image_part(image), {"type": "text", "text": "Describe the image."}]}]
    flashsloth_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    long_answer, _ = reference(flashsloth_messages, [image], max_new_tokens=24, ban_eos=True)
    words = long_answer.split()
    assert len(words) > 8, long_answer
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24, logit_bias=BAN_EOS)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (long_answer, "length")
    assert response.usage.completion_tokens == 24
    text, finish, chunks = streamed(client, messages=messages, max_tokens=24, logit_bias=BAN_EOS)
    assert (text, finish) == (long_answer, ["length"])
    assert sum(bool(chunk.choices and chunk.choices[0].delta.content) for chunk in chunks) > 4, "not streamed"

    short, _ = reference(flashsloth_messages, [image], max_new_tokens=3, ban_eos=True)
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=3, logit_bias=BAN_EOS)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (short, "length")

    stop = next(word for word in words[1:] if word not in words[0])  # a word that first shows up after the start
    cut = long_answer[: long_answer.index(stop)].strip()
    assert cut
    request = dict(messages=messages, max_tokens=24, logit_bias=BAN_EOS)
    response = client.chat.completions.create(model=MODEL_ID, stop=[stop, "never seen"], **request)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (cut, "stop")
    assert response.usage.completion_tokens < 24
    assert streamed(client, stop=stop, **request)[:2] == (cut, ["stop"])


def test_seeded_sampling_is_reproducible_and_equals_in_process_sampling(server, reference):
    client = client_for(server)
    image, _ = scene(8)
    messages = [{"role": "user", "content": [image_part(image), {"type": "text", "text": "Describe the image."}]}]
    flashsloth_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    settings = {"temperature": 1.3, "top_p": 0.95}
    answers = {
        seed: reference(flashsloth_messages, [image], max_new_tokens=12, seed=seed, ban_eos=True, **settings)[0]
        for seed in (11, 12, 13)
    }
    assert len(set(answers.values())) > 1, "sampling at temperature 1.3 should vary with the seed"
    for seed, expected in [*answers.items(), (11, answers[11])]:
        response = client.chat.completions.create(
            model=MODEL_ID, messages=messages, seed=seed, max_tokens=12, logit_bias=BAN_EOS, **settings
        )
        assert response.choices[0].message.content == expected


def test_concurrent_requests_are_batched_and_answers_unchanged(slow_server, reference):
    client = client_for(slow_server)
    requests, expected = [], []
    for seed in range(20, 32):
        image, question = scene(seed, size=96 + 8 * (seed % 5))
        # Half of them run to their own max_tokens (EOS banned), so the rows of a batch end at different steps.
        ban_eos = seed % 2 == 0
        max_tokens = 4 + seed % 7 if ban_eos else CAP
        request = {
            "max_tokens": max_tokens,
            **({"logit_bias": BAN_EOS} if ban_eos else {}),
            "messages": [{"role": "user", "content": [image_part(image), {"type": "text", "text": question}]}],
        }
        requests.append((request, seed % 3 == 1))
        flashsloth_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        expected.append(reference(flashsloth_messages, [image], max_new_tokens=max_tokens, ban_eos=ban_eos)[0])
    _, before = call(slow_server, "GET", "/health")
    answers = [None] * len(requests)

    def send(index):
        request, stream = requests[index]
        if stream:
            answers[index] = streamed(client, **request)[0]
        else:
            answers[index] = client.chat.completions.create(model=MODEL_ID, **request).choices[0].message.content

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _, after = call(slow_server, "GET", "/health")
    assert answers == expected
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)
    assert after["largest_batch"] > 1


def test_errors_are_openai_errors_and_the_server_stays_up(server, reference):
    client = client_for(server)
    image, question = scene(9)
    good = [{"role": "user", "content": [image_part(image), {"type": "text", "text": question}]}]
    bomb = io.BytesIO()
    from PIL import Image

    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 megapixels in a few kilobytes
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()
    long_text = " ".join(["shape"] * 300)
    near_context = " ".join(["shape"] * 200)
    cases = [
        (dict(messages=[{"role": "robot", "content": "hi"}]), 400, "unknown_role", "robot"),
        (
            dict(messages=[{"role": "user", "content": [image_part(image)] * 3 + [{"type": "text", "text": "?"}]}]),
            400,
            "too_many_images",
            "at most 2",
        ),
        (
            dict(
                messages=[
                    {"role": "user", "content": [image_part(image.resize((600, 600))), {"type": "text", "text": "?"}]}
                ]
            ),
            400,
            "image_too_large",
            "600x600",
        ),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bomb_url}}]}]),
            400,
            "image_too_large",
            "12000x12000",
        ),
        (
            dict(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64," + base64.b64encode(b"no image").decode()
                                },
                            }
                        ],
                    }
                ]
            ),
            400,
            "invalid_image",
            "Cannot decode",
        ),
        (
            dict(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
                    }
                ]
            ),
            400,
            "invalid_image",
            "base64",
        ),
        (
            dict(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}],
                    }
                ]
            ),
            400,
            "remote_images_disabled",
            "--allow-remote-images",
        ),
        (dict(messages=good, max_tokens=CAP + 1), 400, "max_tokens_over_cap", f"cap of {CAP}"),
        (dict(messages=[{"role": "user", "content": long_text}]), 400, "context_length_exceeded", "model_max_length"),
        (
            dict(messages=[{"role": "user", "content": near_context}], max_tokens=CAP),
            400,
            "context_length_exceeded",
            "context is 256 tokens",
        ),
        (dict(messages=good, n=2), 400, None, "'n' must be 1"),
        (dict(messages=good, top_p=0), 400, None, "'top_p' must be between"),
        (dict(messages=good, logit_bias={"99999": -100}), 400, None, "not a token id"),
        (dict(messages=[{"role": "user", "content": "What is <image> here?"}]), 400, None, "reserved"),
        (
            dict(messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]),
            400,
            None,
            "only be the first",
        ),
        (dict(messages=good, temperature=-1), 400, None, "'temperature' must be between"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
            400,
            None,
            "unsupported content part type",
        ),
        (dict(messages=[{"role": "assistant", "content": "hello"}]), 400, None, "last message must be a user"),
        (dict(messages=good, model="gpt-4o"), 404, "model_not_found", "flashsloth-demo"),
    ]
    for request, status, code, fragment in cases:
        request = {"model": MODEL_ID, **request}
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**request)
        error = caught.value
        assert error.status_code == status, (request, error)
        assert set(error.body) == {"message", "type", "param", "code"}, error.body
        assert error.body["code"] == code and fragment in error.body["message"], error.body
        assert error.body["type"] == "invalid_request_error"

    status, body = raw_json(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    huge = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * (3 * 2**20 // 2)}]}
    status, body = raw_json(server, "POST", "/v1/chat/completions", json.dumps(huge).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = raw_json(server, "GET", "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}

    expected = reference(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], [image]
    )[0]
    assert client.chat.completions.create(model=MODEL_ID, messages=good).choices[0].message.content == expected
    assert call(server, "GET", "/health")[1]["status"] == "ok"


def wait_for(url: str, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = call(url, "GET", "/health")[1]
        if predicate(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_health_answers_while_generating_and_a_client_that_leaves_frees_its_slot(slow_server):
    image, _ = scene(10)
    body = {
        "model": MODEL_ID,
        "max_tokens": CAP,
        "stream": True,
        "logit_bias": BAN_EOS,
        "messages": [
            {"role": "user", "content": [image_part(image), {"type": "text", "text": "Describe the image."}]}
        ],
    }
    before = call(slow_server, "GET", "/health")[1]
    connection, response = raw_request(slow_server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    try:
        assert response.status == 200
        while True:
            line = response.readline().decode()
            assert line, "the stream ended before its first words"
            if '"content": "' in line and '"content": ""' not in line:
                break
        started = time.perf_counter()
        health = call(slow_server, "GET", "/health")[1]
        assert time.perf_counter() - started < 1.0 and health["running"] == 1
    finally:
        connection.close()
    # The client closed the stream after its first words: the row ends at once, not at the end of its answer.
    health = wait_for(slow_server, lambda health: health["running"] == 0)
    assert health["running"] == 0 and health["cancelled"] == before["cancelled"] + 1

    # A plain (not streamed) request whose client gives up waiting and closes the connection.
    parsed = urllib.parse.urlsplit(slow_server)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=1.0)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": False}).encode())
        with pytest.raises(TimeoutError):
            connection.getresponse()
    finally:
        connection.close()
    health = wait_for(slow_server, lambda health: health["cancelled"] == before["cancelled"] + 2)
    assert health["running"] == 0 and health["cancelled"] == before["cancelled"] + 2


def test_collate_pads_like_the_processor(reference):
    processor = reference.processor
    prompts, images = [], []
    for seed, count in ((1, 1), (2, 0), (3, 2)):
        content = [{"type": "image"}] * count + [
            {"type": "text", "text": "What is left of the circle?" * (seed % 2 + 1)}
        ]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
        images.append([scene(seed + index)[0] for index in range(count)])

    class Alone:
        def __init__(self, prompt, prompt_images):
            self.inputs = processor(images=prompt_images or None, text=prompt, return_tensors="pt")

    batch = processor(images=images, text=prompts, return_tensors="pt")
    collated = collate(
        [Alone(prompt, prompt_images) for prompt, prompt_images in zip(prompts, images)],
        processor.tokenizer.pad_token_id,
    )
    assert set(collated) == set(batch)
    for name in batch:
        torch.testing.assert_close(collated[name], batch[name], rtol=0, atol=0)


def test_visible_text_holds_back_what_may_change():
    assert visible_text(" red cir", ("circle",), final=False) == ("red", False)
    assert visible_text(" red circle on", ("circle",), final=False) == ("red", True)
    assert visible_text(" red \ufffd", (), final=False) == ("red", False)
    assert visible_text(" red  ", (), final=True) == ("red", False)


def test_remote_images_only_when_allowed(tmp_path):
    """--allow-remote-images: an http image is downloaded (here from a server on 127.0.0.1) and checked like any."""
    import functools
    import http.server

    from PIL import Image

    from flashsloth.serve.protocol import ApiError, Limits, load_image_url

    scene(1)[0].save(tmp_path / "scene.png")
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with pytest.raises(ApiError, match="--allow-remote-images"):
            load_image_url(f"{base}/scene.png", Limits(), "image")
        allowed = Limits(allow_remote_images=True)
        image = load_image_url(f"{base}/scene.png", allowed, "image")
        assert (np.asarray(image) == np.asarray(scene(1)[0])).all()
        with pytest.raises(ApiError, match="12000x12000") as caught:
            load_image_url(f"{base}/bomb.png", allowed, "image")
        assert caught.value.code == "image_too_large"
        with pytest.raises(ApiError, match="Cannot download"):
            load_image_url(f"{base}/missing.png", allowed, "image")
    finally:
        files.shutdown()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds none: what a decompression bomb's header looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_image_checks_happen_before_decoding():
    from flashsloth.serve.protocol import ApiError, Limits, decode_image

    for width, height in ((30000, 30000), (5000, 5000)):  # beyond PIL's own limit, and beyond only the server's
        with pytest.raises(ApiError) as caught:
            decode_image(png_header_only(width, height), Limits(), "image")
        assert caught.value.code == "image_too_large", caught.value.message
    with pytest.raises(ApiError, match="Cannot decode") as caught:  # a valid header with its pixels missing
        decode_image(png_header_only(64, 64), Limits(), "image")
    assert caught.value.code == "invalid_image"
    buffer = io.BytesIO()
    scene(2)[0].save(buffer, format="JPEG")
    assert decode_image(buffer.getvalue(), Limits(), "image").size == (144, 144)


def test_serve_listens_on_this_machine_only_by_default():
    from flashsloth.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.model, args.allow_remote_images) == ("127.0.0.1", str(DEMO_MODEL_DIR), False)


def test_quantized_server_answers_like_the_fp32_model(reference):
    """`flashsloth serve --quantize int8` loads the weights quantized (torchao) and, on the demo model, answers
    every request as the fp32 model does in-process."""
    pytest.importorskip("torchao", reason="--quantize needs torchao: pip install 'flashsloth[quant]'")
    from fastapi.testclient import TestClient

    from flashsloth.cli import build_parser
    from flashsloth.serve.cli import build_server

    args = build_parser().parse_args(["serve", "--quantize", "int8", "--max-batch-size", "4"])
    app, _ = build_server(args)
    with TestClient(app) as client:
        model = app.state.engine.model
        assert model.config.quantization_config.quant_method == "torchao"
        assert type(model.model.language_model.layers[0].mlp.fc1.weight.data) is not torch.Tensor  # a torchao tensor
        for seed in (4, 5, 6):
            image, question = scene(seed)
            content = [image_part(image), {"type": "text", "text": question}]
            response = client.post(
                "/v1/chat/completions",
                json={"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": 8},
            )
            assert response.status_code == 200, response.text
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            expected, _ = reference(messages, [image], max_new_tokens=8)
            assert response.json()["choices"][0]["message"]["content"] == expected
