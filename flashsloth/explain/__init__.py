"""
Attention maps: where FlashSloth's embedded query tokens looked in an image while reading a question.

`query_attention_map(model, processor, image, question)` runs one prefill on eager attention and returns EmbQ's
weights over the image's patches and over the instruction (`QueryAttentionMap`); `draw_explanation` turns them into a
heat-map picture, and `flashsloth explain IMAGE --question Q --output heat.png` does both from the command line (see
docs/attention-maps.md).
"""

import argparse

from ..cli_errors import CliError
from ..demo import DEMO_MODEL_DIR


def add_commands(subparsers) -> None:
    explain = subparsers.add_parser(
        "explain",
        help="Draw where the model's query tokens looked in an image for a question, as a heat-map PNG.",
        description="Run the model once on an image and a question on eager attention, and draw where its embedded "
        "query tokens (EmbQ) looked in the image: the image and the heat map of their attention side by side, with "
        "the question and the model's answer. Also prints the instruction tokens the queries read most.",
    )
    explain.add_argument("image", metavar="IMAGE", help="The image file.")
    explain.add_argument("--question", required=True, help="The question about the image.")
    explain.add_argument("--output", required=True, metavar="PNG", help="Where to write the picture (a .png file).")
    explain.add_argument(
        "--model",
        default=str(DEMO_MODEL_DIR),
        metavar="DIR_OR_REPO",
        help="Checkpoint folder or Hub repository of a FlashSloth model and processor (default: the embedded demo "
        "model).",
    )
    explain.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    explain.add_argument(
        "--hd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Cut the image into 5 crops (FlashSloth-HD) or not; the map shows the whole-image crop "
        "(default: the processor's setting).",
    )
    explain.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="Most tokens of the answer written on the picture; 0 writes none (default: %(default)s).",
    )
    explain.set_defaults(handler=run_explain)


def run_explain(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..cli import load_image
    from .heatmap import draw_explanation, query_attention_map

    if not args.question.strip():
        raise CliError("--question is empty")
    if not args.output.lower().endswith(".png"):
        raise CliError(f"--output must name a .png file, got {args.output}")
    if args.max_new_tokens < 0:
        raise CliError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}")
    image = load_image(args.image)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, trust_remote_code=True, attn_implementation="eager"
        )
        model.to(device).eval()
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        raise CliError(f"cannot load the model {args.model}: {str(error).splitlines()[0]}") from error
    processor_kwargs = {}
    if args.hd is not None:
        if not hasattr(processor.image_processor, "image_hd"):
            raise CliError(f"--hd/--no-hd: the processor of {args.model} has no HD mode")
        processor_kwargs["image_hd"] = args.hd
    try:
        attention = query_attention_map(model, processor, image, args.question, **processor_kwargs)
    except ValueError as error:
        raise CliError(str(error).splitlines()[0]) from error
    answer = None
    if args.max_new_tokens:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=prompt, return_tensors="pt", **processor_kwargs).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            output_ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = processor.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    try:
        draw_explanation(image, attention, args.question, answer).save(args.output)
    except OSError as error:
        raise CliError(f"cannot write {args.output}: {error}") from error
    reading = attention.instruction_weights.mean(dim=0)
    top = reading.argsort(descending=True)[:3].tolist()
    print(f"wrote {args.output}")
    if answer is not None:
        print(f"answer: {answer}")
    words = ", ".join(f"{attention.instruction_tokens[index].strip() or repr(attention.instruction_tokens[index])} "
                      f"({reading[index]:.2f})" for index in top)
    print(f"instruction tokens the queries read most: {words}")


__all__ = ["add_commands", "draw_explanation", "query_attention_map", "QueryAttentionMap"]


def __getattr__(name: str):
    if name in ("QueryAttentionMap", "draw_explanation", "heat_overlay", "query_attention_map"):
        from . import heatmap

        return getattr(heatmap, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
