"""Training on transformers' Trainer: stages, loss, gradient checkpointing, resuming, the saved folder, the CLI."""

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import (
    TRAIN_ARGUMENTS,
    llava_records,
    logged_losses,
    tiny_processor,
    tiny_training_model,
    write_llava_json,
)
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from flashsloth.training.data import FlashSlothDataCollator, LlavaDataset
from flashsloth.training.stages import STAGE_GROUPS, configure_trainable, format_trainable_table, parameter_group
from flashsloth.training.trainer import (
    build_trainer,
    is_complete_checkpoint,
    last_complete_checkpoint,
    resolve_checkpoint,
    train,
)


TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def dataset():
    return LlavaDataset(llava_records(8))


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed_groups(before, after) -> tuple[set, set]:
    """
    The parameter groups with at least one changed tensor, and those with at least one unchanged tensor. Attention
    key biases are left out: softmax ignores a shift shared by all keys, so their gradient is exactly zero (EmbQ's
    text attention) or rounding noise.
    """
    changed, unchanged = set(), set()
    for name, tensor in before.items():
        if not name.endswith("k_proj.bias"):
            (unchanged if torch.equal(tensor, after[name]) else changed).add(parameter_group(name))
    return changed, unchanged


@pytest.mark.parametrize(
    "stage, train_vision_tower",
    [(1, False), (2, False), (2, True)],
    ids=["stage1", "stage2", "stage2-vision"],
)
def test_stage_changes_exactly_its_groups(processor, dataset, tmp_path, stage, train_vision_tower):
    model = tiny_training_model(processor)
    before = snapshot(model)
    trainer = build_trainer(
        model,
        processor,
        dataset,
        tmp_path,
        stage=stage,
        train_vision_tower=train_vision_tower,
        max_steps=2,
        save_strategy="no",
        **TRAIN_ARGUMENTS,
    )
    trainer.train()
    changed, unchanged = changed_groups(before, model.state_dict())
    expected = set(STAGE_GROUPS[stage]) | ({"vision_tower"} if train_vision_tower else set())
    assert changed == expected
    # Every tensor of a trained group moved (none silently left out of the optimizer).
    assert not changed & unchanged, f"partly frozen groups: {changed & unchanged}"


def test_group_learning_rates_give_groups_their_own_rate_through_the_schedule(processor, dataset, tmp_path):
    model = tiny_training_model(processor)
    arguments = {**TRAIN_ARGUMENTS, "learning_rate": 1e-3, "warmup_steps": 2, "lr_scheduler_type": "cosine"}
    trainer = build_trainer(
        model, processor, dataset, tmp_path, stage=2, group_learning_rates={"multi_modal_projector": 1e-4}, **arguments
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rate_of = {
        id(parameter): group["initial_lr"] for group in trainer.optimizer.param_groups for parameter in group["params"]
    }
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert len(rate_of) == len(trainable)
    for name, parameter in trainable.items():
        expected = 1e-4 if parameter_group(name) == "multi_modal_projector" else 1e-3
        assert rate_of[id(parameter)] == pytest.approx(expected), name
    for _ in range(4):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    rates = {group["lr"] for group in trainer.optimizer.param_groups}
    assert len(rates) == 2 and 0 < min(rates) < max(rates) < 1e-3
    assert min(rates) / max(rates) == pytest.approx(0.1)


def test_group_learning_rates_are_checked(processor, dataset, tmp_path):
    model = tiny_training_model(processor)
    with pytest.raises(ValueError, match="Unknown parameter group.*projector.*multi_modal_projector"):
        build_trainer(model, processor, dataset, tmp_path, stage=2, group_learning_rates={"projector": 1e-4})
    with pytest.raises(ValueError, match="must be positive"):
        build_trainer(model, processor, dataset, tmp_path, stage=2, group_learning_rates={"lm_head": 0})


def test_trainable_table(processor):
    model = tiny_training_model(processor)
    rows = {row.group: row for row in configure_trainable(model, stage=1)}
    assert rows["spatial_pooling"].trainable == rows["spatial_pooling"].total > 0
    assert rows["multi_modal_projector"].trainable == rows["multi_modal_projector"].total > 0
    assert rows["language_model"].trainable == rows["vision_tower"].trainable == rows["query_tokens"].trainable == 0
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    assert rows["total"].trainable == trainable
    assert rows["total"].total == sum(parameter.numel() for parameter in model.parameters())
    table = format_trainable_table(model).splitlines()
    assert table[0].split() == ["group", "trainable", "total", "trainable", "%"]
    pooling_line = next(line for line in table if line.startswith("spatial_pooling"))
    assert pooling_line.split()[-1] == "100.0"
    assert next(line for line in table if line.startswith("language_model")).split()[1] == "0"
    with pytest.raises(ValueError, match="Unknown training stage"):
        configure_trainable(model, stage=3)


def test_tiny_run_lowers_the_loss_and_saves_a_loadable_checkpoint(processor, dataset, tmp_path):
    trained = train(
        tiny_training_model(processor),
        processor,
        dataset,
        tmp_path / "run",
        stage=2,
        max_steps=8,
        save_strategy="no",
        **TRAIN_ARGUMENTS,
    )
    assert trained.config.text_config.use_cache is True  # restored after training without a cache
    model_dir = tmp_path / "run" / "model"
    loaded = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    loaded_processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    end_of_turn = loaded_processor.tokenizer.convert_tokens_to_ids("</s>")
    assert end_of_turn in loaded.generation_config.eos_token_id

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the color?"}]}]
    prompt = loaded_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = loaded_processor(images=[dataset[0]["images"][0]], text=prompt, return_tensors="pt")
    generated = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    reference = trained.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(generated, reference)


def test_loss_decreases_on_a_tiny_run(processor, dataset, tmp_path):
    model = tiny_training_model(processor)
    trainer = build_trainer(
        model, processor, dataset, tmp_path, stage=2, max_steps=8, save_strategy="no", **TRAIN_ARGUMENTS
    )
    trainer.train()
    losses = logged_losses(trainer.state.log_history)
    assert len(losses) == 8
    assert max(losses[-2:]) < 0.7 * losses[0], losses


def test_gradient_checkpointing_applies_and_keeps_loss_and_gradients(processor, dataset):
    batch = FlashSlothDataCollator(processor)([dataset[index] for index in range(4)])
    plain = tiny_training_model(processor).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.language_model.layers)

    results = []
    for model in (plain, checkpointed):
        calls = []
        hook = model.model.language_model.layers[1].self_attn.register_forward_hook(lambda *args: calls.append(1))
        torch.manual_seed(0)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        hook.remove()
        gradients = {
            name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
        }
        results.append((loss.detach(), gradients, len(calls)))
    (plain_loss, plain_grads, plain_calls), (checkpointed_loss, checkpointed_grads, checkpointed_calls) = results
    # The checkpointed layer runs again in the backward pass: checkpointing really applies to FlashSloth's own loop.
    assert (plain_calls, checkpointed_calls) == (1, 2)
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain_grads.keys() == checkpointed_grads.keys()
    assert any(name.startswith("model.language_model.layers.0.") for name in plain_grads)
    for name, gradient in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], gradient, msg=name)


def test_bf16_with_activation_checkpointing_through_the_trainer(processor, dataset, tmp_path):
    model = tiny_training_model(processor)
    trainer = build_trainer(
        model,
        processor,
        dataset,
        tmp_path,
        stage=2,
        max_steps=2,
        save_strategy="no",
        bf16=True,
        activation_checkpointing=True,
        **TRAIN_ARGUMENTS,
    )
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    losses = logged_losses(trainer.state.log_history)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # float32 master weights
    assert model.config.text_config.use_cache is True  # switched off while training only


def test_group_by_length_uses_the_dataset_length_estimates(processor, tmp_path):
    dataset = LlavaDataset(llava_records(16))
    trainer = build_trainer(
        tiny_training_model(processor),
        processor,
        dataset,
        tmp_path,
        stage=1,
        max_steps=1,
        train_sampling_strategy="group_by_length",
        **TRAIN_ARGUMENTS,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == dataset.lengths
    assert sorted(sampler) == list(range(16))


class StopAt(TrainerCallback):
    """Stops training after the step `step` (after its checkpoint is saved), like an interrupted job."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def run_stage1(processor, dataset, output_dir, resume=None, callbacks=None, max_steps=6):
    model = tiny_training_model(processor)
    captured = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            captured["start_step"] = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            captured["history"] = list(state.log_history)
            captured["step"] = state.global_step

    train(
        model,
        processor,
        dataset,
        output_dir,
        stage=1,
        resume_from_checkpoint=resume,
        callbacks=[Capture(), *(callbacks or [])],
        max_steps=max_steps,
        save_steps=2,
        lr_scheduler_type="linear",
        **TRAIN_ARGUMENTS,
    )
    return model, captured


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(processor, dataset, tmp_path):
    uninterrupted, _ = run_stage1(processor, dataset, tmp_path / "full")
    _, first = run_stage1(processor, dataset, tmp_path / "run", callbacks=[StopAt(4)])
    assert first["step"] == 4 and last_complete_checkpoint(tmp_path / "run").endswith("checkpoint-4")
    resumed, second = run_stage1(processor, dataset, tmp_path / "run", resume=True)
    assert second["step"] == 6
    new_steps = [entry["step"] for entry in second["history"] if "loss" in entry and entry["step"] > 4]
    assert new_steps == [5, 6]
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)


def corrupt(checkpoint: Path, how: str):
    state = checkpoint / "trainer_state.json"
    if how == "no state":
        state.unlink()
    elif how == "truncated state":
        text = state.read_text()
        state.write_text(text[: len(text) // 2])
    elif how == "no weights":
        (checkpoint / "model.safetensors").unlink()


@pytest.fixture(scope="module")
def finished_run(processor, dataset, tmp_path_factory):
    """A stage-1 run of 4 steps with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_stage1(processor, dataset, run_dir, max_steps=4)
    return run_dir


@pytest.mark.parametrize("how", ["no state", "truncated state", "no weights"])
def test_incomplete_checkpoints_are_skipped(finished_run, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert is_complete_checkpoint(run_dir / "checkpoint-4")
    corrupt(run_dir / "checkpoint-4", how)
    (run_dir / "checkpoint-6").mkdir()  # a save that died right after creating its folder
    assert not is_complete_checkpoint(run_dir / "checkpoint-4")
    assert not is_complete_checkpoint(run_dir / "checkpoint-6")
    assert last_complete_checkpoint(run_dir) == str(run_dir / "checkpoint-2")
    assert resolve_checkpoint(True, str(run_dir)) == str(run_dir / "checkpoint-2")
    with pytest.raises(ValueError, match="not a complete"):
        resolve_checkpoint(str(run_dir / "checkpoint-4"), str(run_dir))


def test_resume_without_a_complete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="No complete checkpoint"):
        resolve_checkpoint(True, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))


def test_kill_9_while_saving_a_checkpoint_leaves_the_previous_one_to_resume_from(processor, dataset, tmp_path):
    run_dir = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, str(TESTS_DIR / "training_helpers.py"), "kill-during-save", str(run_dir)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    # The kill hit checkpoint-4 after its weights and optimizer were written, halfway through its state file.
    assert (run_dir / "checkpoint-4" / "model.safetensors").is_file()
    assert (run_dir / "checkpoint-4" / "trainer_state.json").is_file()
    assert not is_complete_checkpoint(run_dir / "checkpoint-4")
    assert last_complete_checkpoint(run_dir) == str(run_dir / "checkpoint-2")

    _, resumed = run_stage1(processor, dataset, run_dir, resume=True)
    assert resumed["start_step"] == 2 and resumed["step"] == 6
    assert [entry["step"] for entry in resumed["history"] if "loss" in entry and entry["step"] > 2] == [3, 4, 5, 6]
    assert is_complete_checkpoint(run_dir / "checkpoint-4") and is_complete_checkpoint(run_dir / "checkpoint-6")


def run_cli(*arguments, cwd=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flashsloth.cli", "train", *map(str, arguments)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_cli_trains_a_saved_checkpoint_end_to_end(processor, tmp_path):
    from model_helpers import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "base", processor)
    data = write_llava_json(tmp_path / "data", num_samples=6)
    common = ["--model", tmp_path / "base", "--data", data, "--images", tmp_path / "data" / "images"]
    common += [
        "--output",
        tmp_path / "run",
        "--stage",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--logging-steps",
        "1",
    ]
    result = run_cli(*common, "--max-steps", "2", "--save-steps", "2", "--group-by-length", "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "language_model" in result.stdout and "trainable" in result.stdout  # the table of trainable parameters
    assert "'loss'" in result.stdout + result.stderr
    assert is_complete_checkpoint(tmp_path / "run" / "checkpoint-2")

    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", trust_remote_code=True)
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model", trust_remote_code=True)
    assert changed_groups(base.state_dict(), trained.state_dict())[0] == set(STAGE_GROUPS[2])

    # LoRA through the same entry point, in this process.
    from flashsloth.cli import main

    lora_arguments = [str(argument) for argument in common[:-10]] + ["--output", str(tmp_path / "lora")]
    assert main(["train", *lora_arguments, "--stage", "2", "--lora", "--lora-rank", "4", "--max-steps", "2"]) == 0
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "lora" / "model", trust_remote_code=True)
    assert changed_groups(base.state_dict(), merged.state_dict())[0] == {
        "spatial_pooling",
        "multi_modal_projector",
        "query_tokens",
        "embedded_query",
        "language_model",
    }


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    from flashsloth.cli import main

    data = write_llava_json(tmp_path / "data", num_samples=2)
    (tmp_path / "model").mkdir()
    common = ["train", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "run")]
    config = tmp_path / "ds.json"
    config.write_text("{}")
    cases = [
        (
            [
                "train",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(tmp_path / "no.json"),
                "--output",
                "x",
                "--stage",
                "1",
            ],
            f"training data not found: {tmp_path / 'no.json'}",
        ),
        (
            ["train", "--model", str(tmp_path / "none"), "--data", str(data), "--output", "x", "--stage", "1"],
            "model folder not found",
        ),
        (common + ["--stage", "1", "--lora"], "only stage 2 trains"),
        (common + ["--stage", "1", "--train-vision-tower"], "belongs to stage 2"),
        (common + ["--stage", "2", "--warmup-ratio", "1.5"], "--warmup-ratio"),
        (common + ["--stage", "2", "--group-lr", "multi_modal_projector"], "--group-lr takes GROUP=LR"),
        (common + ["--stage", "2", "--group-lr", "lm_head=fast"], "--group-lr takes GROUP=LR"),
        (common + ["--stage", "2", "--deepspeed", str(tmp_path / "missing.json")], "DeepSpeed config not found"),
    ]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        cases.append((common + ["--stage", "2", "--deepspeed", str(config)], "needs the deepspeed package"))
    for arguments, message in cases:
        assert main(arguments) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("flashsloth: error: ") and message in error and "\n" not in error, error


def test_cli_options_map_to_training_arguments():
    from flashsloth.cli import build_parser

    parser = build_parser()
    required = ["train", "--model", "m", "--data", "d.json", "--output", "o", "--stage", "2"]
    assert parser.parse_args(required + ["--resume"]).resume is True
    assert parser.parse_args(required + ["--resume", "o/checkpoint-4"]).resume == "o/checkpoint-4"
    assert parser.parse_args(required).resume is None
    with pytest.raises(SystemExit):
        parser.parse_args(required + ["--bf16", "--fp16"])
