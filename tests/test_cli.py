"""The `flashsloth` console script, run end to end in subprocesses on a tiny saved checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flashsloth.cli import main
from model_helpers import save_tiny_checkpoint
from processing_helpers import make_tiny_processor


MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    processor = make_tiny_processor(image_size=84, num_image_tokens_per_crop=4)
    model = save_tiny_checkpoint(directory / "model", processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    image.save(directory / "image.png")
    return directory, model, processor


def run_cli(*args: str, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "flashsloth.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=environment,
        cwd=cwd,
        timeout=300,
    )


def greedy_answer(model, processor, messages, images) -> str:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images, text=prompt)
    with torch.no_grad():
        output_ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def user(text: str, num_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def test_help_explains_the_commands_and_options(capsys):
    result = run_cli("--help")
    assert result.returncode == 0 and "ask" in result.stdout and "chat" in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--help"])
    assert exit_info.value.code == 0
    ask_help = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for option in ("--model", "--question", "--hd", "--no-hd", "--dtype", "--device", "--attn", "--max-new-tokens",
                   "--temperature", "--compile", "demo model"):
        assert option in ask_help, option
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "stdin" in capsys.readouterr().out


def test_compile_is_the_default_on_cuda_only():
    from flashsloth.cli import build_parser, compile_by_default

    parser = build_parser()
    for argv, device, expected in (
        ([], "cuda", True), ([], "cuda:1", True), ([], "cpu", False),
        (["--no-compile"], "cuda", False), (["--compile"], "cpu", True),
    ):
        args = parser.parse_args(["ask", "image.png", "--question", "q", *argv])
        assert compile_by_default(args.compile, device) is expected, (argv, device)


def test_ask_prints_the_greedy_answer(checkpoint):
    directory, model, processor = checkpoint
    result = run_cli(
        "ask", "--model", str(directory / "model"), str(directory / "image.png"),
        "--question", "What is in the picture?", "--max-new-tokens", str(MAX_NEW_TOKENS), "--dtype", "float32",
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(directory / "image.png")
    expected = greedy_answer(model, processor, [user("What is in the picture?", 1)], [image])
    assert result.stdout == expected + "\n"


def test_chat_answers_two_turns_from_stdin(checkpoint):
    directory, model, processor = checkpoint
    result = run_cli(
        "chat", "--model", str(directory / "model"), "--image", str(directory / "image.png"),
        "--max-new-tokens", str(MAX_NEW_TOKENS),
        stdin="What is in the picture?\nAnd what colour is it?\n",
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(directory / "image.png")
    messages = [user("What is in the picture?", 1)]
    first = greedy_answer(model, processor, messages, [image])
    messages += [
        {"role": "assistant", "content": [{"type": "text", "text": first.strip()}]},
        user("And what colour is it?", 0),
    ]
    second = greedy_answer(model, processor, messages, [image])
    assert result.stdout == f"{first}\n{second}\n"


def test_missing_image_exits_2_with_one_line(checkpoint, tmp_path):
    result = run_cli("ask", "--model", str(checkpoint[0] / "model"), str(tmp_path / "missing.png"), "--question", "What?")
    assert result.returncode == 2
    assert result.stderr == f"flashsloth: error: image not found: {tmp_path / 'missing.png'}\n"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["ask", "--model", "{model}", "{not_an_image}", "--question", "What?"], "cannot read the image"),
        (["ask", "--model", "{missing}/", "{image}", "--question", "What?"], "model folder not found"),
        (["ask", "--model", "{model}", "{image}", "--question", " "], "--question is empty"),
        (["chat", "--model", "{model}", "--image", "{missing}"], "image not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(checkpoint, tmp_path, capsys, arguments, message):
    directory = checkpoint[0]
    (tmp_path / "notes.png").write_text("not an image")
    paths = {
        "model": str(directory / "model"),
        "image": str(directory / "image.png"),
        "missing": str(tmp_path / "missing.png"),
        "not_an_image": str(tmp_path / "notes.png"),
    }
    assert main([argument.format(**paths) for argument in arguments]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("flashsloth: error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1
