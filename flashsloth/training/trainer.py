"""Train FlashSloth on transformers' `Trainer`: the paper's stages, LoRA, resuming, the final HF-native folder.

Everything the `Trainer` offers works as usual through the training arguments: gradient accumulation, bf16/fp16,
activation (gradient) checkpointing, schedulers, logging, evaluation, and several processes under `torchrun` or
`accelerate launch` (DDP; DeepSpeed/FSDP through their `TrainingArguments` fields).
"""

import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..conversion import default_generation_config, save_native_checkpoint
from .data import FlashSlothDataCollator
from .lora import add_query_tokens_to_adapter, apply_lora, lora_config, merge_lora, save_adapter
from .stages import GROUPS, configure_trainable, format_trainable_table, parameter_group, stage_groups


logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
ADAPTER_FOLDER = "adapter"
MODEL_FOLDER = "model"
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """
    Whether a `checkpoint-N` folder was written to the end. The `Trainer` writes the weights, optimizer, scheduler
    and RNG states first and `trainer_state.json` last, so a readable state file for step N beside the weights means
    the save finished; a process killed mid-save leaves it missing or cut short.
    """
    folder = Path(checkpoint_dir)
    match = _CHECKPOINT_PATTERN.match(folder.name)
    if match is None or not folder.is_dir() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == int(match.group(1))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the highest N that was saved completely, or `None`."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT_PATTERN.match(path.name)) and path.is_dir()
    )
    for step, path in reversed(steps):
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning(f"Skipping {path}: its save did not finish (the run was interrupted while writing it).")
    return None


def resolve_checkpoint(resume_from_checkpoint: bool | str | os.PathLike | None, output_dir: str) -> str | None:
    """`True`: the last complete checkpoint of `output_dir` (error if none); a path: that checkpoint, checked."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"No complete checkpoint to resume from in {output_dir}; start without resuming, or pass the path "
                "of a checkpoint folder."
            )
        return checkpoint
    checkpoint = Path(resume_from_checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"Checkpoint folder not found: {checkpoint}.")
    if not is_complete_checkpoint(checkpoint):
        raise ValueError(
            f"{checkpoint} is not a complete `{PREFIX_CHECKPOINT_DIR}-N` folder (no readable {TRAINER_STATE_NAME} "
            "for its step, or no weights); resume from an earlier checkpoint."
        )
    return str(checkpoint)


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft_model(model) else model


class FlashSlothTrainer(Trainer):
    """
    `Trainer` with FlashSloth's additions: `train(resume_from_checkpoint=True)` skips checkpoints whose save did not
    finish, the model runs without a KV cache while training, length-grouped batching reads the dataset's `lengths`
    (an estimate from [`LlavaDataset`], no tokenising of the whole dataset), and LoRA checkpoints also hold the query
    tokens; `group_learning_rates` (`{group: lr}`, groups as in [`stages.GROUPS`]) gives parameter groups their own
    peak learning rate, as LLaVA's `mm_projector_lr` does for the projector.
    """

    def __init__(self, *args, group_learning_rates: dict[str, float] | None = None, **kwargs):
        self.group_learning_rates = check_group_learning_rates(group_learning_rates)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self.group_learning_rates:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        group_of = {
            id(parameter): parameter_group(name).removesuffix(" (LoRA)")
            for name, parameter in (model or self.model).named_parameters()
        }
        param_groups = []
        for param_group in optimizer.param_groups:
            by_rate = {}
            for parameter in param_group["params"]:
                rate = self.group_learning_rates.get(group_of[id(parameter)], param_group["lr"])
                by_rate.setdefault(rate, []).append(parameter)
            param_groups += [{**param_group, "params": params, "lr": rate} for rate, params in by_rate.items()]
        # No step has run yet: the optimizer has no state, only its groups change.
        optimizer.param_groups.clear()
        for param_group in param_groups:
            optimizer.add_param_group(param_group)
        return optimizer

    def train(self, resume_from_checkpoint: bool | str | None = None, **kwargs):
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        text_config = _base_model(self.model).config.text_config
        use_cache = text_config.use_cache
        text_config.use_cache = False
        try:
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)
        finally:
            text_config.use_cache = use_cache

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=list(lengths)
            )
        return super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.args.should_save and _is_peft_model(model):
            add_query_tokens_to_adapter(model, output_dir if output_dir is not None else self.args.output_dir)


def check_group_learning_rates(group_learning_rates: dict[str, float] | None) -> dict[str, float]:
    """`group_learning_rates` validated: known group names, positive rates."""
    group_learning_rates = dict(group_learning_rates or {})
    unknown = sorted(set(group_learning_rates) - set(GROUPS))
    if unknown:
        raise ValueError(f"Unknown parameter group(s) {unknown} in group_learning_rates; use some of {list(GROUPS)}.")
    bad = {group: rate for group, rate in group_learning_rates.items() if not rate > 0}
    if bad:
        raise ValueError(f"group_learning_rates must be positive numbers, got {bad}.")
    return group_learning_rates


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (`torch.accelerator` exists from torch 2.6 on)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def build_training_arguments(output_dir: str | os.PathLike, **training_arguments) -> TrainingArguments:
    """`TrainingArguments` with the defaults FlashSloth needs (overridable): keep the collator's columns, no
    experiment trackers, labels named `labels`, DDP tolerant of text-only batches (which leave SAP, the projector,
    EmbQ and the query tokens without gradients on some ranks), pinned memory only with a GPU, and `use_cpu` on a
    machine without an accelerator: only then does accelerate join the processes of `torchrun` into one gloo DDP
    group there (otherwise every process trains alone on all the data)."""
    values = dict(
        remove_unused_columns=False,
        report_to="none",
        label_names=["labels"],
        ddp_find_unused_parameters=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not accelerator_available(),
    )
    values.update(training_arguments)
    if values.get("train_sampling_strategy") == "batch_rebalance":
        raise ValueError("`train_sampling_strategy='batch_rebalance'` is not supported; use 'group_by_length'.")
    return TrainingArguments(output_dir=str(output_dir), **values)


def save_trained_model(model: nn.Module, processor, model_dir: str | os.PathLike, run_name: str | None = None) -> Path:
    """
    Write the trained model and its processor as an HF-native checkpoint folder (config, weights, generation config
    that stops on `</s>`, processor, chat template, remote code, model card), atomically: it loads with
    `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True` like a converted checkpoint.
    """
    name = run_name or Path(model_dir).name
    return save_native_checkpoint(
        model, processor, model_dir, force=True, model_card_context={"model_name": name, "repo_id": name}
    )


def build_trainer(
    model: nn.Module,
    processor,
    train_dataset,
    output_dir: str | os.PathLike,
    *,
    stage: int,
    train_vision_tower: bool = False,
    lora=None,
    eval_dataset=None,
    max_length: int | None = None,
    callbacks: list | None = None,
    group_learning_rates: dict[str, float] | None = None,
    **training_arguments,
) -> FlashSlothTrainer:
    """
    Set a model up for `stage` (freezing, or LoRA wrapping) and build its [`FlashSlothTrainer`]; the arguments are
    those of [`train`]. `trainer.model` is the model to train (a `PeftModel` with LoRA). Logs the table of trainable
    parameters.
    """
    if lora and stage != 2:
        raise ValueError("LoRA adapts the language model, which only stage 2 trains: pass stage=2 with lora.")
    args = build_training_arguments(output_dir, **training_arguments)
    if lora:
        stage_groups(stage, train_vision_tower)  # validates the stage
        config = lora_config(train_vision_tower=train_vision_tower) if lora is True else lora
        model = apply_lora(model, config)
    else:
        configure_trainable(model, stage, train_vision_tower)
    trainer = FlashSlothTrainer(
        model=model,
        args=args,
        data_collator=FlashSlothDataCollator(processor, max_length=max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=callbacks,
        group_learning_rates=group_learning_rates,
    )
    if trainer.is_world_process_zero():
        logger.info(f"Training stage {stage}{' with LoRA' if lora else ''}:\n{format_trainable_table(model)}")
    return trainer


def train(
    model: nn.Module,
    processor,
    train_dataset,
    output_dir: str | os.PathLike,
    *,
    stage: int,
    train_vision_tower: bool = False,
    lora=None,
    eval_dataset=None,
    max_length: int | None = None,
    resume_from_checkpoint: bool | str | os.PathLike | None = None,
    callbacks: list | None = None,
    group_learning_rates: dict[str, float] | None = None,
    **training_arguments,
) -> nn.Module:
    """
    Train a FlashSloth model in one of the paper's stages and save the result.

    `output_dir` is the run folder: `checkpoint-N` folders while training, the final model in `output_dir/model`
    (an HF-native checkpoint folder) and, with LoRA, the adapter in `output_dir/adapter`.

    Args:
        model: a [`FlashSlothForConditionalGeneration`] (float32 weights: bf16/fp16 training uses autocast).
        processor: its [`FlashSlothProcessor`]; batches are built with it and it is saved with the model.
        train_dataset: a [`LlavaDataset`] (or any dataset of `{"messages", "images"}` items).
        output_dir: the run folder.
        stage: 1 (SAP + projector) or 2 (SAP, projector, query tokens, EmbQ, language model, lm_head).
        train_vision_tower: stage 2 of the HD variant: also train the vision encoder.
        lora: stage 2 with LoRA adapters on the language model instead of training it fully: `True` for the default
            [`lora_config`], or a peft `LoraConfig`. SAP, projector, EmbQ and the query tokens train fully and are
            saved with the adapter; the final model is the merged one.
        eval_dataset: optional evaluation dataset (set `eval_strategy` to use it).
        max_length: longest sample in tokens; a longer one stops training with an error naming it.
        resume_from_checkpoint: `True` to continue from the last completely saved `checkpoint-N` of `output_dir`
            (incomplete ones, from a run killed while saving, are skipped), or a checkpoint folder.
        callbacks: extra `TrainerCallback`s.
        group_learning_rates: peak learning rates of some parameter groups, e.g. `{"multi_modal_projector": 1e-4}`
            (the others use `learning_rate`); the schedule scales them all alike.
        **training_arguments: any `TrainingArguments` field, e.g. `num_train_epochs`, `max_steps`,
            `per_device_train_batch_size`, `gradient_accumulation_steps`, `learning_rate`, `warmup_steps` (below 1:
            a fraction),
            `lr_scheduler_type`, `bf16`, `fp16`, `activation_checkpointing`, `train_sampling_strategy=
            "group_by_length"`, `save_steps`, `logging_steps`, `seed`, `deepspeed`, `fsdp`.

    Returns:
        The trained model (merged into a plain FlashSloth model when trained with LoRA).
    """
    trainer = build_trainer(
        model,
        processor,
        train_dataset,
        output_dir,
        stage=stage,
        train_vision_tower=train_vision_tower,
        lora=lora,
        eval_dataset=eval_dataset,
        max_length=max_length,
        callbacks=callbacks,
        group_learning_rates=group_learning_rates,
        **training_arguments,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model = trainer.model
    run_dir = Path(trainer.args.output_dir)
    is_main_process = trainer.is_world_process_zero()
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        if _is_peft_model(model):
            raise ValueError(
                "Merging LoRA adapters of a DeepSpeed/FSDP-sharded model is not supported; train LoRA with DDP."
            )
        # The weights are sharded across processes: the Trainer gathers them (every process takes part).
        trainer.save_model(str(run_dir / MODEL_FOLDER))
        if is_main_process:
            default_generation_config(processor).save_pretrained(run_dir / MODEL_FOLDER)
        return model
    if _is_peft_model(model):
        save_adapter(model, run_dir / ADAPTER_FOLDER, is_main_process=is_main_process)
        model = merge_lora(model)
    # The generation settings the saved folder gets (stop on `</s>` too), so that the returned model answers alike.
    model.generation_config = default_generation_config(processor)
    if is_main_process:
        path = save_trained_model(model, processor, run_dir / MODEL_FOLDER, run_name=run_dir.name)
        logger.info(f"Saved the trained model to {path}.")
    trainer.accelerator.wait_for_everyone()
    return model
