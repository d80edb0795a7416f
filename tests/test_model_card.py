"""The Hub model card template (`model_card.md`): its metadata, and its usage snippets run against a tiny converted
checkpoint."""

import configparser
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_helpers import make_original_checkpoint
from flashsloth.conversion import render_model_card
from flashsloth.conversion.convert import convert_original_checkpoint
from flashsloth.conversion.export import _model_card_template_path, transformers_requirement


REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    source = make_original_checkpoint(root / "source", "base", num_shards=1)
    return convert_original_checkpoint(source, root / "FlashSloth-tiny")


def test_template_is_the_repository_model_card():
    assert _model_card_template_path() == REPO_ROOT / "model_card.md"


def test_metadata_and_sections(checkpoint):
    card = ModelCard((checkpoint / "README.md").read_text())
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert {"custom_code", "arxiv:2412.04317"} <= set(data["tags"])
    assert data["base_model"] == ["microsoft/phi-2", "google/siglip-so400m-patch14-384"]
    for heading in ("# FlashSloth-tiny", "## Token budget", "## Usage", "## Results reported in the paper", "## Citation"):
        assert f"\n{heading}\n" in card.text, heading
    assert "https://arxiv.org/abs/2412.04317" in card.text and 'revision="<commit sha>"' in card.text
    assert f"`{transformers_requirement()}`" in card.text
    assert "81 image tokens plus 9 query tokens" in card.text


def test_transformers_requirement_is_the_packages():
    requirement = transformers_requirement()
    assert re.fullmatch(r"transformers>=[\d.]+,<\d+", requirement)
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    declared = next(line for line in setup["options"]["install_requires"].split("\n") if line.startswith("transformers"))
    assert SpecifierSet(requirement.removeprefix("transformers")) == Requirement(declared).specifier


def test_missing_values_are_reported(tmp_path):
    with pytest.raises(ValueError, match=r"\['checkpoint_summary', 'model_name', 'repo_id', 'transformers_requirement'\]"):
        render_model_card({})


def run_snippet(code: str) -> str:
    """Execute a snippet of the card as a user would, returning what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "model_card.md", "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def test_usage_snippets_run(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)).save("picture.jpg")
    readme = render_model_card(
        {"model_name": "tiny", "repo_id": str(checkpoint), "transformers_requirement": "x", "checkpoint_summary": ""}
    )
    # Fewer new tokens than the card's 64 keep the test fast on CPU.
    generate_snippet, pipeline_snippet = (
        snippet.replace("max_new_tokens=64", f"max_new_tokens={MAX_NEW_TOKENS}") for snippet in PYTHON_BLOCK.findall(readme)
    )

    # What the snippets should print, computed here with the same model, inputs and greedy settings.
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    image = Image.open("picture.jpg")

    def answer(text: str, dtype: torch.dtype) -> str:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True, dtype=dtype)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        output_ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
        return processor.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    expected = answer("What is in the picture?", torch.bfloat16)
    assert expected.strip() and run_snippet(generate_snippet) == expected + "\n"
    expected = answer("Describe it.", torch.float32)
    assert expected.strip() and run_snippet(pipeline_snippet) == expected + "\n"
