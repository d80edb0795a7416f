"""LoRA on FlashSloth: what trains, what is saved, merging, loading adapters on a base folder, QLoRA's guard."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from training_helpers import TRAIN_ARGUMENTS, llava_records, tiny_processor, tiny_training_model
from transformers import AutoModelForImageTextToText

from flashsloth.training.data import FlashSlothDataCollator, LlavaDataset
from flashsloth.training.lora import (
    ADAPTER_WEIGHTS_NAME,
    QUERY_TOKENS_ADAPTER_KEY,
    apply_lora,
    language_model_target_pattern,
    load_adapter,
    load_model_for_qlora,
    lora_config,
)
from flashsloth.training.trainer import build_trainer, train


# What LoRA may change: adapter weights, the trained copies of the modules to save, the query tokens.
TRAINABLE_MARKERS = (".lora_A.", ".lora_B.", ".modules_to_save.", "query_tokens")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def dataset():
    return LlavaDataset(llava_records(8))


@pytest.fixture(scope="module")
def batch(processor, dataset):
    return FlashSlothDataCollator(processor)([dataset[index] for index in range(4)])


def test_adapters_only_on_the_language_model_linear_layers(processor):
    model = apply_lora(tiny_training_model(processor))
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    layers = model.get_base_model().config.text_config.num_hidden_layers
    expected = {
        f"base_model.model.model.language_model.layers.{index}.{path}"
        for index in range(layers)
        for path in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.dense",
            "mlp.fc1",
            "mlp.fc2",
        )
    }
    assert adapted == expected  # not the same-named layers of SigLIP, SAP or EmbQ
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(any(marker in name for marker in TRAINABLE_MARKERS) for name in trainable)
    assert {"spatial_pooling", "multi_modal_projector", "embedded_query"} <= {
        part for name in trainable if ".modules_to_save." in name for part in name.split(".")
    }
    with pytest.raises(ValueError, match="non-empty list"):
        language_model_target_pattern("q_proj")


def test_lora_changes_only_adapters_modules_to_save_and_query_tokens(processor, dataset, tmp_path):
    trainer = build_trainer(
        tiny_training_model(processor),
        processor,
        dataset,
        tmp_path,
        stage=2,
        lora=True,
        max_steps=2,
        save_steps=2,
        activation_checkpointing=True,
        **TRAIN_ARGUMENTS,
    )
    model = trainer.model
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainer.train()
    after = model.state_dict()
    changed = {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}
    assert changed and all(any(marker in name for marker in TRAINABLE_MARKERS) for name in changed)
    # Everything that may train did (lora_A from its random start, lora_B from zero), except the attention key
    # biases, whose gradient softmax makes zero.
    trainable = {name for name in before if any(marker in name for marker in TRAINABLE_MARKERS)}
    assert trainable - changed <= {name for name in trainable if name.endswith("k_proj.bias")}
    # Checkpoints carry the query tokens with the adapter, so resuming restores them.
    saved = load_file(tmp_path / "checkpoint-2" / ADAPTER_WEIGHTS_NAME)
    torch.testing.assert_close(saved[QUERY_TOKENS_ADAPTER_KEY], after["base_model.model.model.query_tokens"])


@pytest.fixture(scope="module")
def lora_run(processor, dataset, tmp_path_factory):
    """A saved base checkpoint and a LoRA run on it: (base folder, run folder, merged model)."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_training_model(processor)
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    model = AutoModelForImageTextToText.from_pretrained(root / "base", trust_remote_code=True)
    merged = train(
        model, processor, dataset, root / "run", stage=2, lora=True, max_steps=3, save_strategy="no", **TRAIN_ARGUMENTS
    )
    return root / "base", root / "run", merged


def test_adapter_loads_on_the_base_folder_and_equals_the_merged_model(lora_run, batch):
    base_dir, run_dir, merged = lora_run
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    # Plain peft loading on a fresh base restores adapters, modules to save and the query tokens.
    base = AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True).eval()
    base_query_tokens = base.model.query_tokens.detach().clone()
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    assert not torch.equal(adapted.get_base_model().model.query_tokens, base_query_tokens)
    torch.testing.assert_close(adapted.get_base_model().model.query_tokens, merged.model.query_tokens)
    checked = load_adapter(
        AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True), run_dir / "adapter"
    )

    merged_folder = AutoModelForImageTextToText.from_pretrained(run_dir / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        adapter_logits = adapted(**batch).logits
        torch.testing.assert_close(checked.eval()(**batch).logits, adapter_logits, rtol=0, atol=0)
        torch.testing.assert_close(merged.eval()(**batch).logits, adapter_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged_folder(**batch).logits, adapter_logits, rtol=1e-4, atol=1e-4)
        base_logits = (
            AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True).eval()(**batch).logits
        )
    assert (base_logits - adapter_logits).abs().max() > 1e-2  # the adapter does change the model


def test_merged_model_is_a_plain_flashsloth_model(lora_run, processor):
    _, run_dir, merged = lora_run
    assert type(merged).__name__ == "FlashSlothForConditionalGeneration"
    assert not any("lora_" in name or "modules_to_save" in name for name in merged.state_dict())
    assert set(merged.state_dict()) == set(tiny_training_model(processor).state_dict())


def test_lora_needs_stage_2_and_qlora_needs_a_gpu(processor, dataset, tmp_path):
    with pytest.raises(ValueError, match="stage=2"):
        build_trainer(tiny_training_model(processor), processor, dataset, tmp_path, stage=1, lora=True)
    with pytest.raises(ValueError, match="rank"):
        lora_config(rank=0)
    try:
        import bitsandbytes  # noqa: F401

        has_bitsandbytes = True
    except ImportError:
        has_bitsandbytes = False
    if has_bitsandbytes and torch.cuda.is_available():
        pytest.skip("bitsandbytes and a GPU are present: QLoRA is available")
    with pytest.raises((ImportError, RuntimeError), match="QLoRA needs"):
        load_model_for_qlora(tmp_path)
