"""Converting original-format FlashSloth checkpoints (made from the parity fixtures) into HF-native folders:
parity through the Auto classes, strict key/shape checks, atomic writes, Hub cache loading and the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_helpers import (
    make_original_checkpoint,
    place_in_hub_cache,
    run_python,
    tree_digest,
)
from flashsloth.cli import main
from flashsloth.conversion import convert as convert_module
from flashsloth.conversion.convert import ConversionError, convert_original_checkpoint
from flashsloth.conversion.shards import write_safetensors
from parity_helpers import ParityFixture, regenerate_original_state_dict


ATOL = 1e-5  # the core parity tolerance (see test_parity.py)
QUESTION = "What is the color of the large square in the picture?"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {variant: make_original_checkpoint(root / variant, variant, num_shards=2) for variant in ("base", "hd")}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    digests = {variant: tree_digest(path) for variant, path in sources.items()}
    folders = {
        variant: convert_original_checkpoint(path, root / variant, max_shard_size="100MB")
        for variant, path in sources.items()
    }
    # The sources are only read.
    assert {variant: tree_digest(path) for variant, path in sources.items()} == digests
    return folders


def no_leftovers(parent, name: str) -> bool:
    """Neither `name` nor a temporary sibling of it exists in `parent`."""
    return not any(path.name == name or path.name.startswith(f".{name}.") for path in parent.iterdir())


def fixture_inputs(processor, fixture: ParityFixture):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == fixture.reference["prompt"]
    return processor(images=[Image.open(fixture.dir / "image.png")], text=prompt, return_tensors="pt")


@pytest.mark.parametrize("variant", ["base", "hd"])
def test_converted_folder_reproduces_the_original(converted, variant):
    fixture = ParityFixture(variant)
    folder = converted[variant]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")  # the folder's own remote code
    assert model.config.num_crops == (5 if variant == "hd" else 1) and model.dtype == torch.float32
    assert processor.image_processor.image_hd == (variant == "hd")
    assert processor.image_processor.image_aspect_ratio == "square"

    inputs = fixture_inputs(processor, fixture)
    expected = fixture.expanded_inputs()
    for name in ("input_ids", "pixel_values", "instruction_mask"):
        assert torch.equal(inputs[name], expected[name]), name

    captured = {}
    hooks = [
        model.model.embedded_query.register_forward_hook(lambda module, args, output: captured.update(embq=output)),
        model.model.multi_modal_projector.register_forward_hook(lambda module, args, output: captured.update(image=output)),
        model.model.spatial_pooling.register_forward_hook(lambda module, args, output: captured.update(sap=output[1])),
    ]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    for hook in hooks:
        hook.remove()
    reference = fixture.tensors
    torch.testing.assert_close(logits[0, reference["logits_positions"]], reference["logits_at_positions"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured["embq"], reference["lqformer_out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured["image"], reference["projected_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured["sap"], reference["sap_weights"], atol=1e-6, rtol=0)
    if variant == "hd":
        return  # greedy decoding of the converted model: once is enough (the core parity tests cover both variants)

    steps = reference["generated_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps)  # greedy from generation_config
    assert output[:, inputs["input_ids"].shape[1] :].tolist() == reference["generated_ids"].tolist()


def test_converted_folder_layout(converted, sources):
    folder = converted["base"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "flashsloth" and config["architectures"] == ["FlashSlothForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_flashsloth.FlashSlothForConditionalGeneration"
    assert (config["image_token_id"], config["query_token_id"]) == (50297, 50295)
    for name in ("configuration_flashsloth.py", "modeling_flashsloth.py", "processing_flashsloth.py",
                 "image_processing_flashsloth.py", "chat_template.jinja", "processor_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [50296, 50256]  # </s> (the released eos) and <|endoftext|>
    assert generation["suppress_tokens"] == [50297, 50295] and generation["do_sample"] is False
    assert generation["pad_token_id"] == 50256 and generation["max_new_tokens"] == 512
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["padding_side"] == "left" and tokenizer_config["model_max_length"] == 3072

    # Sharded at <= 100MB with an index; every tensor equals its source tensor, renamed.
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert all(shard.stat().st_size <= 100_000_000 for shard in shards)
    converted_tensors = {}
    for shard in shards:
        converted_tensors.update(load_file(shard))
    original = regenerate_original_state_dict(ParityFixture("base").dir)
    assert len(converted_tensors) == len(original) == len(index["weight_map"])
    assert torch.equal(converted_tensors["model.embedded_query.up_proj.weight"], original["model.lqformer.up_projector.weight"])
    assert torch.equal(converted_tensors["lm_head.bias"], original["lm_head.bias"])
    readme = (folder / "README.md").read_text()
    assert "{{" not in readme and f"Converted from `{sources['base']}`" in readme


def test_research_code_config_and_pickled_weights(tmp_path):
    """The research code's own format (model_type flashsloth, one .bin file) converts with allow_pickle only."""
    source = make_original_checkpoint(tmp_path / "source", "base", num_shards=1, hub_style=False, dtype=torch.float16)
    tensors = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    torch.save(tensors, source / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        convert_original_checkpoint(source, tmp_path / "out")
    assert no_leftovers(tmp_path, "out")
    folder = convert_original_checkpoint(source, tmp_path / "out", allow_pickle=True)
    converted_tensors = load_file(folder / "model.safetensors")
    # 'auto' follows the config's torch_dtype (float32), not the weights' float16; one shard under 2GB, no index.
    assert {tensor.dtype for tensor in converted_tensors.values()} == {torch.float32}
    assert torch.equal(converted_tensors["lm_head.weight"], tensors["lm_head.weight"].float())
    assert not (folder / "model.safetensors.index.json").exists()

    folder = convert_original_checkpoint(source, tmp_path / "bf16", allow_pickle=True, dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    converted_tensors = load_file(folder / "model.safetensors")
    assert {tensor.dtype for tensor in converted_tensors.values()} == {torch.bfloat16}
    assert torch.equal(converted_tensors["model.query_tokens"], tensors["model.learnable_tokens.token"].to(torch.bfloat16))


def copy_source(source, destination):
    """A copy of a source folder sharing the (read-only here) shard files through hard links."""
    shutil.copytree(source, destination, copy_function=os.link)
    return destination


def rewrite_tensor(folder, edit):
    """Apply `edit(tensors)` to the shard files of `folder` (replacing the links, so the original stays intact)."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        before = set(tensors)
        edit(tensors)
        shard.unlink()
        save_file(tensors, shard, metadata={"format": "pt"})
        for name in before - set(tensors):
            del index["weight_map"][name]
        index["weight_map"].update({name: shard.name for name in set(tensors) - before})
    index_path.write_text(json.dumps(index))


def drop_tensor(tensors):
    tensors.pop("model.lqformer.up_projector.bias", None)


def add_tensors(tensors):
    if "lm_head.bias" in tensors:
        tensors["model.extra_head.weight"] = torch.zeros(3)
        tensors["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(1152)


def reshape_tensor(tensors):
    name = "model.layers.3.mlp.fc1.weight"
    if name in tensors:
        tensors[name] = tensors[name][:, :-1].contiguous()


def truncate_shard(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])


def wrong_architecture(folder):
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(architectures=["PhiForCausalLM"], model_type="phi")
    config_path.unlink()
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda folder: rewrite_tensor(folder, drop_tensor),
            r"1 missing tensors \(in the model, not in the source\): model\.embedded_query\.up_proj\.bias\.",
        ),
        (
            lambda folder: rewrite_tensor(folder, add_tensors),
            r"1 tensors not in the FlashSloth layout: model\.extra_head\.weight; 1 unexpected tensors: "
            r"model\.vision_tower\.vision_tower\.vision_model\.post_layernorm\.weight",
        ),
        (
            lambda folder: rewrite_tensor(folder, reshape_tensor),
            r"1 tensors of the wrong shape: model\.layers\.3\.mlp\.fc1\.weight \[1280, 319\] \(expected \[1280, 320\]\)",
        ),
        (truncate_shard, r"model-00002-of-00002\.safetensors is truncated or corrupt"),
        (wrong_architecture, r"holds a PhiForCausalLM model, not an original FlashSloth checkpoint"),
    ],
    ids=["missing", "extra", "shape", "truncated", "architecture"],
)
def test_corrupt_sources_fail_clearly_and_write_nothing(sources, tmp_path, corrupt, message):
    source = copy_source(sources["base"], tmp_path / "source")
    corrupt(source)
    digest = tree_digest(sources["base"])
    with pytest.raises((ValueError, ConversionError), match=message):
        convert_original_checkpoint(source, tmp_path / "out")
    assert no_leftovers(tmp_path, "out")
    assert tree_digest(sources["base"]) == digest


def test_vision_config_sources(sources, tmp_path):
    source = copy_source(sources["base"], tmp_path / "source")
    vision_config = tmp_path / "siglip.json"
    (source / "vision_config.json").rename(vision_config)
    with pytest.raises(ValueError, match=r"'siglip-tiny-i256'.*--vision-config FILE"):
        convert_original_checkpoint(source, tmp_path / "out")
    # The published so400m config does not fit the tiny tower (intermediate size 4304, not 256).
    config = json.loads((source / "config.json").read_text())
    config["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    (source / "config.json").unlink()
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"tensors of the wrong shape: .*fc1\.weight \[256, 1152\] \(expected \[4304, 1152\]\)"):
        convert_original_checkpoint(source, tmp_path / "out")
    assert no_leftovers(tmp_path, "out")


def test_output_folder_rules(sources, converted, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "previous.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        convert_original_checkpoint(sources["base"], target)
    assert [path.name for path in target.iterdir()] == ["previous.txt"]
    with pytest.raises(ValueError, match="must lie outside the source"):
        convert_original_checkpoint(sources["base"], sources["base"] / "converted")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repository id"):
        convert_original_checkpoint(tmp_path / "no" / "such" / "folder", tmp_path / "x")


def converter_script(source, target) -> str:
    return (
        "from flashsloth.conversion.convert import convert_original_checkpoint\n"
        f"convert_original_checkpoint({str(source)!r}, {str(target)!r}, max_shard_size='10MB', force=True)\n"
    )


def test_failing_converter_leaves_nothing(sources, tmp_path, monkeypatch):
    written = []

    def write_then_fail(path, tensors, load, on_tensor=None):
        if written:
            raise OSError("No space left on device")
        written.append(path)
        write_safetensors(path, tensors, load, on_tensor)

    monkeypatch.setattr(convert_module, "write_safetensors", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        convert_original_checkpoint(sources["base"], tmp_path / "out", max_shard_size="50MB")
    assert written and not written[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_converter_leaves_the_previous_target(sources, converted, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(converted["base"], target)
    before = tree_digest(target)
    process = subprocess.Popen(
        [sys.executable, "-c", converter_script(sources["base"], target)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".out.partial-*/model-00003-of-*.safetensors")):
            assert process.poll() is None, "the converter ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert tree_digest(target) == before
    # The next run removes what the killed one left.
    assert list(tmp_path.glob(".out.partial-*"))
    convert_original_checkpoint(sources["base"], target, max_shard_size="100MB", force=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_hub_source_offline(sources, tmp_path, monkeypatch):
    """A repository id is read from the Hub cache when offline, and a clear error says when it is not there."""
    cache = tmp_path / "cache"
    place_in_hub_cache(sources["base"], cache, repo_id="Tongbo/FlashSloth-3.2B-original")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    message = r"Tongbo/FlashSloth_HD-3\.2B is not a local folder, and as a Hub repository it cannot be downloaded .*pass the folder"
    with pytest.raises(ConnectionError, match=message):
        convert_original_checkpoint("Tongbo/FlashSloth_HD-3.2B", tmp_path / "hd")
    assert no_leftovers(tmp_path, "hd")
    folder = convert_original_checkpoint("Tongbo/FlashSloth-3.2B-original", tmp_path / "base", dtype="bfloat16")
    with safe_open(folder / "model.safetensors", "pt") as handle:
        assert handle.get_slice("lm_head.bias").get_dtype() == "BF16"
    assert "Converted from `Tongbo/FlashSloth-3.2B-original`" in (folder / "README.md").read_text()


HUB_CACHE_SCRIPT = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

repo = "Tongbo/FlashSloth-3.2B"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
image = Image.open(sys.argv[1])
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sys.argv[2]}]}]
inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
with torch.no_grad():
    ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)[0, inputs["input_ids"].shape[1]:].tolist()
pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": sys.argv[2]}]}]
text = pipe(text=chat, max_new_tokens=4, min_new_tokens=4, return_full_text=False)[0]["generated_text"]
print(json.dumps({"ids": ids, "text": text, "module": type(model).__module__, "flashsloth": "flashsloth" in sys.modules}))
"""


def test_converted_folder_loads_by_repo_id_offline_from_the_hub_cache(converted, tmp_path):
    cache = tmp_path / "hub"
    place_in_hub_cache(converted["base"], cache)
    fixture = ParityFixture("base")
    environment = {"HF_HUB_CACHE": str(cache), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = run_python(HUB_CACHE_SCRIPT, str(fixture.dir / "image.png"), QUESTION, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    expected_ids = fixture.tensors["generated_ids"][0, :4].tolist()
    assert output["ids"] == expected_ids
    assert output["module"].startswith("transformers_modules") and not output["flashsloth"]
    processor = AutoProcessor.from_pretrained(converted["base"], trust_remote_code=True)
    assert output["text"] == processor.decode(expected_ids, skip_special_tokens=True)


def test_cli_convert_with_dry_run_push(sources, tmp_path, capsys):
    source = copy_source(sources["base"], tmp_path / "source")
    vision_config = tmp_path / "vision.json"
    (source / "vision_config.json").rename(vision_config)
    target = tmp_path / "out"
    exit_code = main([
        "convert", str(source), str(target), "--vision-config", str(vision_config), "--dtype", "float16",
        "--max-shard-size", "60MB", "--push-to-hub", "someone/flashsloth", "--revision", "v1", "--dry-run",
    ])
    output = capsys.readouterr()
    assert exit_code == 0, output.err[-3000:]
    lines = output.out.splitlines()
    assert lines[0] == f"Wrote {target}"
    assert lines[1].startswith("Would upload ") and "someone/flashsloth (v1)" in lines[1]
    listed = {line.split()[0] for line in lines[2:]}
    assert listed == {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "README.md", "modeling_flashsloth.py"} <= listed
    assert 'model_id = "someone/flashsloth"' in (target / "README.md").read_text()
    assert json.loads((target / "config.json").read_text())["dtype"] == "float16"

    assert main(["convert", str(source), str(target), "--vision-config", str(vision_config)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not empty" in error and "--force" in error
    assert main(["convert", str(source), str(tmp_path / "other"), "--dry-run"]) == 2
    assert "--dry-run: only used with --push-to-hub REPO" in capsys.readouterr().err
    assert main(["convert", str(source), str(tmp_path / "other"), "--max-shard-size", "lots"]) == 2
    assert "`size` is not in a valid format" in capsys.readouterr().err
    assert main(["convert", str(source), str(tmp_path / "other")]) == 2  # no vision config anywhere
    assert "--vision-config FILE" in capsys.readouterr().err
    assert no_leftovers(tmp_path, "other")
