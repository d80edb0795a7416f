"""`flashsloth train`: train a FlashSloth checkpoint on LLaVA-format data (stage 1 or 2, full or LoRA).

Runs as it is on one process, and under `torchrun --nproc_per_node N -m flashsloth.cli train ...` or
`accelerate launch -m flashsloth.cli train ...` on several (DDP). torch and transformers are imported only when the
command runs.
"""

import argparse
import importlib.util
import logging
import os
import sys

from ..cli_errors import CliError


# The paper's learning rates: 1e-3 for the alignment stage, 2e-5 for instruction tuning.
DEFAULT_LEARNING_RATES = {1: 1e-3, 2: 2e-5}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def add_commands(subparsers):
    description = (
        "Train a FlashSloth checkpoint on LLaVA-format data with transformers' Trainer. Stage 1 trains Spatial "
        "Attention Pooling and the projector; stage 2 also the query tokens, EmbQ and the language model (or LoRA "
        "adapters on it with --lora). OUTPUT receives checkpoint-N folders, the final model in OUTPUT/model and, with "
        "LoRA, the adapter in OUTPUT/adapter. For several processes: torchrun --nproc_per_node N -m flashsloth.cli "
        "train ..."
    )
    parser = subparsers.add_parser(
        "train", help="Train a FlashSloth checkpoint (stage 1 or 2, full or LoRA).", description=description
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="FlashSloth checkpoint folder (model and processor) to start from.",
    )
    parser.add_argument(
        "--data", required=True, metavar="JSON", help="LLaVA-format JSON file: a list of {id, image, conversations}."
    )
    parser.add_argument(
        "--images",
        metavar="DIR",
        help="Folder the image paths of the JSON are relative to (default: the JSON's folder).",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="Run folder for checkpoints and the final model."
    )
    parser.add_argument(
        "--stage", required=True, type=int, choices=(1, 2), help="1: SAP + projector; 2: instruction tuning."
    )
    parser.add_argument(
        "--train-vision-tower",
        action="store_true",
        help="Stage 2 only: also train the vision encoder (the HD recipe).",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="Stage 2 with LoRA adapters on the language model instead of training it fully.",
    )
    parser.add_argument(
        "--qlora",
        action="store_true",
        help="Like --lora with the language model loaded in 4-bit (needs bitsandbytes and a CUDA GPU).",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: %(default)s).")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: twice the rank).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Training epochs (default: %(default)s).")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="Stop after this many optimizer steps; overrides --epochs (default: off).",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="Samples per process per forward pass (default: %(default)s)."
    )
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="Forward passes per optimizer step (default: %(default)s).",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Peak learning rate (default: 1e-3 in stage 1, 2e-5 in stage 2, as in the paper).",
    )
    parser.add_argument(
        "--group-lr",
        action="append",
        default=[],
        metavar="GROUP=LR",
        help="Peak learning rate of one parameter group, e.g. multi_modal_projector=1e-4 (repeatable; groups: "
        "vision_tower, spatial_pooling, multi_modal_projector, query_tokens, embedded_query, language_model, lm_head).",
    )
    parser.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.03,
        help="Fraction of the steps spent warming up (default: %(default)s).",
    )
    parser.add_argument(
        "--lr-scheduler", choices=SCHEDULERS, default="cosine", help="Learning-rate schedule (default: %(default)s)."
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s).")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="Longest sample in tokens, images expanded; a longer one is an error (default: the tokenizer's limit).",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (default: float32).")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision with loss scaling (GPU only).")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass to save memory.",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Continue an interrupted run: from the last completely saved checkpoint of --output, or from CHECKPOINT.",
    )
    parser.add_argument(
        "--group-by-length", action="store_true", help="Batch samples of similar length together (less padding)."
    )
    parser.add_argument("--seed", type=int, default=42, help="Random seed (default: %(default)s).")
    parser.add_argument(
        "--save-steps", type=int, default=500, help="Save a checkpoint every this many steps (default: %(default)s)."
    )
    parser.add_argument(
        "--save-total-limit", type=int, default=None, help="Keep at most this many checkpoints (default: all)."
    )
    parser.add_argument(
        "--logging-steps", type=int, default=10, help="Log the loss every this many steps (default: %(default)s)."
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="Data loading worker processes (default: %(default)s)."
    )
    parser.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help="DeepSpeed config JSON (e.g. ZeRO-2/3, see docs/training.md); needs the deepspeed package and GPUs.",
    )
    parser.set_defaults(handler=run_train)


def _check_paths(args: argparse.Namespace):
    if not os.path.isdir(args.model):
        raise CliError(f"model folder not found: {args.model}")
    if not os.path.isfile(args.data):
        raise CliError(f"training data not found: {args.data}")
    if args.deepspeed is not None:
        if not os.path.isfile(args.deepspeed):
            raise CliError(f"DeepSpeed config not found: {args.deepspeed}")
        if importlib.util.find_spec("deepspeed") is None:
            raise CliError("--deepspeed needs the deepspeed package (pip install deepspeed) and CUDA GPUs")
    if args.images is not None and not os.path.isdir(args.images):
        raise CliError(f"image folder not found: {args.images}")
    if args.train_vision_tower and args.stage != 2:
        raise CliError("--train-vision-tower belongs to stage 2 (--stage 2)")
    if not 0 <= args.warmup_ratio < 1:
        raise CliError(f"--warmup-ratio must be at least 0 and below 1, got {args.warmup_ratio}")
    if (args.lora or args.qlora) and args.stage != 2:
        raise CliError("--lora/--qlora adapt the language model, which only stage 2 trains (--stage 2)")


def parse_group_learning_rates(entries: list[str]) -> dict[str, float]:
    """`["multi_modal_projector=1e-4", ...]` as `{group: rate}`."""
    rates = {}
    for entry in entries:
        group, separator, rate = entry.partition("=")
        try:
            rates[group.strip()] = float(rate)
        except ValueError:
            separator = ""
        if not separator:
            raise CliError(f"--group-lr takes GROUP=LR, e.g. multi_modal_projector=1e-4; got {entry!r}")
    return rates


def _log_to_stdout():
    """Show this package's progress messages (the table of trainable parameters, where the model went)."""
    package_logger = logging.getLogger("flashsloth")
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def _load(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .lora import load_model_for_qlora

    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        if args.qlora:
            model = load_model_for_qlora(args.model, compute_dtype=torch.float16 if args.fp16 else torch.bfloat16)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                args.model, trust_remote_code=True, dtype=torch.float32
            )
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        raise CliError(f"cannot load {args.model}: {error}") from error
    return model, processor


def run_train(args: argparse.Namespace):
    _check_paths(args)
    group_learning_rates = parse_group_learning_rates(args.group_lr)
    _log_to_stdout()
    from .data import LlavaDataset
    from .lora import lora_config
    from .trainer import train

    try:
        dataset = LlavaDataset(args.data, args.images)
    except (OSError, ValueError) as error:
        raise CliError(str(error)) from error
    model, processor = _load(args)
    lora = None
    if args.lora or args.qlora:
        lora = lora_config(rank=args.lora_rank, alpha=args.lora_alpha, train_vision_tower=args.train_vision_tower)
    try:
        train(
            model,
            processor,
            dataset,
            args.output,
            stage=args.stage,
            train_vision_tower=args.train_vision_tower,
            lora=lora,
            max_length=args.max_length,
            resume_from_checkpoint=args.resume,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.lr if args.lr is not None else DEFAULT_LEARNING_RATES[args.stage],
            group_learning_rates=group_learning_rates,
            warmup_steps=args.warmup_ratio,  # a value below 1 is a fraction of the steps
            lr_scheduler_type=args.lr_scheduler,
            weight_decay=args.weight_decay,
            bf16=args.bf16,
            fp16=args.fp16,
            activation_checkpointing=args.gradient_checkpointing,
            train_sampling_strategy="group_by_length" if args.group_by_length else "random",
            seed=args.seed,
            save_steps=args.save_steps,
            save_total_limit=args.save_total_limit,
            logging_steps=args.logging_steps,
            dataloader_num_workers=args.num_workers,
            deepspeed=args.deepspeed,
        )
    except (OSError, ValueError) as error:
        raise CliError(str(error)) from error
