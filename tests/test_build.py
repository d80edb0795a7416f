"""Building a FlashSloth from pretrained components (`flashsloth.conversion.build_from_components`) and saving it as an
HF-native checkpoint (`save_native_checkpoint`)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, SiglipVisionModel

from conversion_helpers import TINY_BUILD_OVERRIDES, make_llama, make_phi, make_siglip, released_tokenizer
from flashsloth.cli import main
from flashsloth.conversion import build_from_components, default_generation_config, save_native_checkpoint
from flashsloth.conversion.build import default_query_anchor_token_id, default_query_layer_index


NEW_MODULES = ("model.spatial_pooling.", "model.multi_modal_projector.", "model.query_tokens", "model.embedded_query.")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    return {
        "siglip": make_siglip(root / "siglip", full=True),
        "siglip_vision": make_siglip(root / "siglip_vision", full=False, seed=1),
        "phi": make_phi(root / "phi"),
        "llama": make_llama(root / "llama"),
    }


@pytest.fixture(scope="module")
def built_phi(components):
    return build_from_components(components["siglip"], components["phi"], **TINY_BUILD_OVERRIDES)


def chat_inputs(processor, answer: str = "It is red."):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color of the square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    prompt = processor.apply_chat_template(messages)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[(labels == processor.image_token_id) | (labels == processor.query_token_id)] = -100
    return inputs, labels


def train_one_step(model, processor):
    inputs, labels = chat_inputs(processor)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    return loss, changed


def test_phi_build_keeps_the_pretrained_weights(components, built_phi):
    model, processor = built_phi
    siglip_state = SiglipVisionModel.from_pretrained(components["siglip"]).state_dict()
    phi = AutoModelForCausalLM.from_pretrained(components["phi"])
    state = model.state_dict()
    # The encoder keeps its layers up to vision_feature_layer (-2: 2 of 3); later layers, post-layernorm, head dropped.
    assert model.config.num_vision_layers == 2
    for name, tensor in siglip_state.items():
        native = f"model.vision_tower.{name}"
        if name.startswith(("encoder.layers.2.", "post_layernorm.", "head.")):
            assert native not in state
        else:
            torch.testing.assert_close(state[native], tensor, rtol=0, atol=0)
    old_vocab = phi.config.vocab_size
    for name, tensor in phi.model.state_dict().items():
        native = state[f"model.language_model.{name}"]
        if name == "embed_tokens.weight":
            torch.testing.assert_close(native[:old_vocab], tensor, rtol=0, atol=0)
        else:
            torch.testing.assert_close(native, tensor, rtol=0, atol=0)
    torch.testing.assert_close(state["lm_head.weight"][:old_vocab], phi.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(state["lm_head.bias"][:old_vocab], phi.lm_head.bias, rtol=0, atol=0)


def test_phi_build_adds_the_tokens_and_resizes(components, built_phi):
    model, processor = built_phi
    tokenizer = processor.tokenizer
    phi_vocab = AutoModelForCausalLM.from_pretrained(components["phi"]).config.vocab_size
    assert len(tokenizer) == phi_vocab + 3 == model.config.text_config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.lm_head.weight.shape[0]
    vocabulary = tokenizer.get_vocab()
    assert model.config.image_token_id == vocabulary["<image>"] == processor.image_token_id
    assert model.config.query_token_id == vocabulary["<learnable>"] == processor.query_token_id
    assert model.config.query_anchor_token_id == tokenizer.encode(" .", add_special_tokens=False)[-1]
    # New rows start at the mean of the pretrained rows.
    embeddings = model.get_input_embeddings().weight
    for new_id in range(phi_vocab, len(tokenizer)):
        torch.testing.assert_close(embeddings[new_id], embeddings[:phi_vocab].mean(dim=0))
    # 84 px / 14 = 6x6 patches, 3x3 windows: 4 tokens per crop, in the config and in the processor.
    assert model.config.image_tokens_per_crop == 4 == processor.num_image_tokens_per_crop
    assert model.config.lm_head_bias and model.config.num_crops == 1
    assert model.config.query_layer_index == default_query_layer_index(4) == 1
    assert model.generation_config.suppress_tokens == [processor.image_token_id, processor.query_token_id]


def test_new_modules_are_initialised(built_phi):
    model, _ = built_phi
    std = model.config.text_config.initializer_range
    for name, parameter in model.named_parameters():
        if not name.startswith(NEW_MODULES):
            continue
        assert torch.isfinite(parameter).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(parameter, torch.ones_like(parameter)), name
        elif name.endswith("bias"):
            assert torch.equal(parameter, torch.zeros_like(parameter)), name
        elif parameter.numel() > 100:
            assert 0.5 * std < parameter.std().item() < 1.5 * std, name


@pytest.mark.parametrize("text", ["phi", "llama"])
def test_built_model_trains_one_step(components, text):
    model, processor = build_from_components(
        components["siglip_vision"], components[text], image_aspect_ratio="pad", **TINY_BUILD_OVERRIDES
    )
    assert model.training
    assert model.config.lm_head_bias == (text == "phi")
    assert (model.lm_head.bias is not None) == (text == "phi")
    assert processor.image_processor.image_aspect_ratio == "pad"
    loss, changed = train_one_step(model, processor)
    assert torch.isfinite(loss) and loss.item() > 0
    for prefix in NEW_MODULES + ("model.language_model.layers.", "lm_head.weight"):
        assert any(name.startswith(prefix) for name in changed), prefix
    # The encoder layers feed SAP and EmbQ, so they get gradients too (the training recipe decides what to freeze).
    assert any(name.startswith("model.vision_tower.") for name in changed)


def test_llama_build_uses_the_sentencepiece_tokenizer(components):
    model, processor = build_from_components(
        components["siglip"], components["llama"], image_hd=True, torch_dtype=torch.bfloat16, **TINY_BUILD_OVERRIDES
    )
    tokenizer = processor.tokenizer
    assert type(tokenizer).__name__ == "LlamaTokenizer" and tokenizer.eos_token == "</s>"
    # Llama's eos already is </s>: only <learnable> and <image> are new.
    assert len(tokenizer) == 122 == model.config.text_config.vocab_size
    assert model.dtype == torch.bfloat16 and model.config.num_crops == 5 and processor.image_processor.image_hd
    assert tokenizer.convert_ids_to_tokens(model.config.query_anchor_token_id) == "."
    assert default_generation_config(processor).eos_token_id == [tokenizer.eos_token_id]


def test_tied_embeddings_stay_tied(tmp_path, components):
    text_model = make_llama(tmp_path / "llama_tied", tie_word_embeddings=True)
    model, processor = build_from_components(components["siglip_vision"], text_model, **TINY_BUILD_OVERRIDES)
    embeddings = model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == embeddings.data_ptr()
    torch.testing.assert_close(embeddings[:120], AutoModelForCausalLM.from_pretrained(text_model).lm_head.weight, rtol=0, atol=0)
    folder = save_native_checkpoint(model.eval(), processor, tmp_path / "saved")
    loaded = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, embeddings, rtol=0, atol=0)


def test_phi2_anchor_is_the_released_one():
    assert default_query_anchor_token_id(released_tokenizer()) == 764


def test_build_rejects_a_vision_model_that_is_not_siglip(components):
    with pytest.raises(ValueError, match="must be SigLIP"):
        build_from_components(components["phi"], components["phi"], **TINY_BUILD_OVERRIDES)


def test_saved_checkpoint_loads_with_the_auto_classes(tmp_path, built_phi):
    model, processor = built_phi
    model.eval()
    target = save_native_checkpoint(model, processor, tmp_path / "built", max_shard_size="200KB")
    names = {path.name for path in target.iterdir()}
    for name in (
        "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
        "processor_config.json", "chat_template.jinja", "README.md", "configuration_flashsloth.py",
        "modeling_flashsloth.py", "processing_flashsloth.py", "image_processing_flashsloth.py",
    ):
        assert name in names, name
    shards = sorted(target.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert json.loads((target / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
    generation = json.loads((target / "generation_config.json").read_text())
    tokenizer = processor.tokenizer
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</s>")]
    assert generation["suppress_tokens"] == [processor.image_token_id, processor.query_token_id]
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 512
    readme = (target / "README.md").read_text()
    assert "{{" not in readme and readme.startswith("---\nlicense: apache-2.0") and "# built" in readme
    assert [path.name for path in tmp_path.iterdir()] == ["built"]  # no temporary folder left

    loaded = AutoModelForImageTextToText.from_pretrained(target, trust_remote_code=True).eval()
    loaded_processor = AutoProcessor.from_pretrained(target, trust_remote_code=True)
    inputs, _ = chat_inputs(loaded_processor)
    reference_inputs, _ = chat_inputs(processor)
    assert torch.equal(inputs["input_ids"], reference_inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**reference_inputs).logits, rtol=0, atol=0)


def test_save_refuses_to_overwrite_and_replaces_with_force(tmp_path, built_phi):
    model, processor = built_phi
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("previous")
    with pytest.raises(FileExistsError, match="not empty"):
        save_native_checkpoint(model, processor, target)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]
    save_native_checkpoint(model, processor, target, force=True, dtype=torch.bfloat16, model_card_context={"repo_id": "me/tiny"})
    assert not (target / "keep.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert {tensor.dtype for tensor in load_file(target / "model.safetensors").values()} == {torch.bfloat16}
    assert 'model_id = "me/tiny"' in (target / "README.md").read_text()
    assert next(model.parameters()).dtype == torch.float32  # the model itself is left as it was


def test_build_command(tmp_path, components, capsys):
    target = tmp_path / "built"
    arguments = ["build", "--vision", str(components["siglip"]), "--text", str(components["llama"]), str(target)]
    assert main(arguments + ["--hd", "--dtype", "bfloat16", "--set", "query_hidden_size=32", "--set", "query_layer_index=3"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"Wrote {target}"]
    config = json.loads((target / "config.json").read_text())
    assert (config["num_crops"], config["query_hidden_size"], config["query_layer_index"]) == (5, 32, 3)
    assert config["dtype"] == "bfloat16" and config["lm_head_bias"] is False
    processor = AutoProcessor.from_pretrained(target, trust_remote_code=True)
    assert processor.image_processor.image_hd and type(processor.tokenizer).__name__ == "LlamaTokenizer"

    assert main(arguments) == 2  # DST exists
    assert "not empty" in capsys.readouterr().err
    missing = ["build", "--vision", str(tmp_path / "nowhere"), "--text", str(components["llama"]), str(tmp_path / "x")]
    assert main(missing) == 2
    error = capsys.readouterr().err
    assert error.startswith("flashsloth: error: ") and error.count("\n") == 1 and "nowhere" in error
    assert main(arguments[:-1] + [str(tmp_path / "y"), "--set", "query_hidden_size"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
