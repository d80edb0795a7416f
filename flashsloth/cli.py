"""The `flashsloth` command: ask a FlashSloth checkpoint about images, chat with it, and the subcommands of the
other parts of the package (each lives in its own module and registers itself through `SUBCOMMAND_MODULES`).

torch and transformers are imported only when a command runs, so `flashsloth --help` and argument errors are instant.
"""

import argparse
import importlib
import logging
import os
import sys
import threading

from .cli_errors import EXIT_USAGE_ERROR, CliError
from .demo import DEMO_MODEL_DIR


# Modules with `add_commands(subparsers)`: each adds its subparsers and sets `handler=function(args)` as default.
SUBCOMMAND_MODULES = (
    "flashsloth.training.cli",
    "flashsloth.conversion.cli",
    "flashsloth.demo.cli",
    "flashsloth.bench.cli",
    "flashsloth.bench.soak",
    "flashsloth.serve.cli",
    "flashsloth.quant.bench",
    "flashsloth.explain",
)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
PREFILL_BUCKET = 64  # `--compile` pads prompts to a multiple of this many tokens
QUANTIZE_CHOICES = ("int8", "int8-dynamic", "int4", "bnb-8bit", "bnb-4bit")  # flashsloth.quant.SCHEMES
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")
CHAT_EXIT_HINT = "One message per line; an empty line or end of input (Ctrl-D) ends the chat; '/image PATH' adds an image to the next message."


def build_parser() -> argparse.ArgumentParser:
    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument(
        "--model",
        default=str(DEMO_MODEL_DIR),
        metavar="DIR_OR_REPO",
        help="Checkpoint folder or Hub repository of a FlashSloth model and processor (loaded with "
        "trust_remote_code=True). Default: the embedded demo model, a tiny FlashSloth that only knows scenes of "
        "coloured circles, squares and triangles (see `flashsloth demo`).",
    )
    model_options.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Weights dtype: 'auto' keeps the checkpoint's (default: %(default)s).",
    )
    model_options.add_argument(
        "--device", default=None, help="Torch device, e.g. 'cpu', 'cuda', 'cuda:1' (default: cuda when available, else cpu)."
    )
    model_options.add_argument(
        "--attn",
        choices=ATTENTION_CHOICES,
        default="sdpa",
        help="Attention implementation; flash_attention_2 needs a GPU and the flash-attn package (default: %(default)s).",
    )
    model_options.add_argument(
        "--hd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Cut every image into 5 crops (FlashSloth-HD) or not; only for processors with an `image_hd` setting "
        "(default: the processor's setting).",
    )
    model_options.add_argument(
        "--max-new-tokens", type=int, default=512, help="Most tokens to generate per answer (default: %(default)s)."
    )
    model_options.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="Sampling temperature; 0 means greedy decoding, the same answer every time (default: %(default)s).",
    )
    model_options.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Generate with a static KV cache and torch.compile'd prefill and decoding steps (CUDA graphs on a GPU), "
        f"prompts padded to multiples of {PREFILL_BUCKET} tokens so that one compiled prefill serves each length: "
        "slow to start, then faster (default: on for CUDA devices, off elsewhere).",
    )
    model_options.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="Quantize the weights while loading: int8 / int8-dynamic / int4 through torchao (CPU or CUDA; int4 "
        "computes in bfloat16; install with pip install -e '.[quant]'), bnb-8bit / bnb-4bit through bitsandbytes "
        "(CUDA only). SAP, the projector, the embedded queries and the output head stay unquantized. Speed and "
        "quality: docs/quantization.md (default: no quantization).",
    )

    parser = argparse.ArgumentParser(
        prog="flashsloth", description="Ask FlashSloth, a tiny multimodal language model, about images."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = commands.add_parser(
        "ask",
        parents=[model_options],
        help="Answer one question about one or more images, streaming the answer to stdout.",
        description="Answer one question about one or more images, streaming the answer to stdout.",
    )
    ask.add_argument("images", nargs="+", metavar="IMAGE", help="Image files, in the order the question refers to them.")
    ask.add_argument("--question", required=True, help="The question about the images.")
    chat = commands.add_parser(
        "chat",
        parents=[model_options],
        help="Chat over several turns, reading your messages from stdin.",
        description=f"Chat over several turns, reading your messages from stdin. {CHAT_EXIT_HINT}",
    )
    chat.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="IMAGE",
        dest="images",
        help="An image file for the first message; repeat the option for several images.",
    )
    ask.set_defaults(handler=run_ask)
    chat.set_defaults(handler=run_chat)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name, __package__).add_commands(commands)
    return parser


def load_image(path: str):
    """Open an image file as RGB, turning every failure into a `CliError`."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise CliError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise CliError(f"cannot read the image {path}: {error}") from error


class Assistant:
    """A loaded model and processor with the generation settings chosen on the command line."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, CompileConfig

        if args.max_new_tokens < 1:
            raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.temperature < 0:
            raise CliError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
        if os.path.sep in args.model and not os.path.isdir(args.model):
            raise CliError(f"model folder not found: {args.model}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        load_kwargs = {"dtype": dtype}
        if getattr(args, "quantize", None):
            from .quant import load_kwargs as quantized_load_kwargs

            try:
                load_kwargs = quantized_load_kwargs(args.quantize, device, dtype)
            except ValueError as error:  # a scheme that cannot run here: what to install or choose instead
                raise CliError(str(error)) from error
        try:
            self.processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
            self.model = AutoModelForImageTextToText.from_pretrained(
                args.model, trust_remote_code=True, attn_implementation=args.attn, **load_kwargs
            )
            if "device_map" not in load_kwargs:
                self.model.to(device)
            if getattr(args, "quantize", None):
                from .quant import finish_loading

                finish_loading(self.model, args.quantize, device)
            self.model.eval()
        except (OSError, ValueError, ImportError, RuntimeError) as error:
            raise CliError(f"cannot load the model {args.model}: {str(error).splitlines()[0]}") from error

        self.processor_kwargs = {}
        if args.hd is not None:
            if not hasattr(self.processor.image_processor, "image_hd"):
                raise CliError(f"--hd/--no-hd: the processor of {args.model} has no HD mode")
            self.processor_kwargs["image_hd"] = args.hd

        self.generate_kwargs = {"max_new_tokens": args.max_new_tokens}
        if args.temperature > 0:
            self.generate_kwargs.update(do_sample=True, temperature=args.temperature)
        else:
            self.generate_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if compile_by_default(args.compile, device):
            compile_config = CompileConfig(mode="reduce-overhead" if device.startswith("cuda") else "default")
            # generate() compiles on its own only on accelerators; the option asks for it everywhere.
            compile_config._compile_all_devices = True
            self.generate_kwargs.update(cache_implementation="static", compile_config=compile_config)
            # Prompts left-padded to a length bucket: one compiled prefill (CUDA graphs on a GPU) per bucket.
            self.processor_kwargs["pad_to_multiple_of"] = PREFILL_BUCKET

    def answer(self, messages: list[dict], images: list) -> str:
        """Generate the assistant's reply to `messages`, streaming it to stdout; returns the reply."""
        import torch
        from transformers import TextIteratorStreamer

        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        try:
            inputs = self.processor(images=images or None, text=prompt, return_tensors="pt", **self.processor_kwargs)
        except ValueError as error:
            raise CliError(str(error).splitlines()[0]) from error
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        generate_kwargs = dict(self.generate_kwargs)
        if "compile_config" in generate_kwargs:  # the whole prefill in one compiled chunk
            generate_kwargs["prefill_chunk_size"] = inputs["input_ids"].shape[1]
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure = []

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, **generate_kwargs, streamer=streamer)
            except Exception as error:  # re-raised in the main thread once the stream has ended
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        chunks = []
        for chunk in streamer:
            chunks.append(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()
        thread.join()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if failure:
            raise failure[0]
        return "".join(chunks).strip()


def compile_by_default(requested: bool | None, device: str) -> bool:
    """`--compile` / `--no-compile` as given; unset, compiled generation on CUDA devices (CUDA graphs) and eager
    elsewhere (on a CPU compiling costs more than it saves for one answer)."""
    return requested if requested is not None else device.startswith("cuda")


def user_message(text: str, num_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def run_ask(args: argparse.Namespace) -> None:
    images = [load_image(path) for path in args.images]
    if not args.question.strip():
        raise CliError("--question is empty")
    Assistant(args).answer([user_message(args.question, len(images))], images)


def run_chat(args: argparse.Namespace) -> None:
    pending_images = [load_image(path) for path in args.images]
    assistant = Assistant(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_EXIT_HINT, file=sys.stderr)
    messages, images = [], []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not text:
            return
        if text.startswith("/image "):
            try:
                pending_images.append(load_image(text[len("/image ") :].strip()))
            except CliError as error:  # a typo in a path should not end the conversation
                print(f"flashsloth: {error}", file=sys.stderr)
            continue
        messages.append(user_message(text, len(pending_images)))
        images += pending_images
        pending_images = []
        reply = assistant.answer(messages, images)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})


# Import-time warnings of torchao (its kernels built for other CUDA and Python versions) and of torch about torchao's
# enums, printed whenever transformers loads a model with torchao installed: noise for every command, quantized or not.
QUIETED_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args.handler(args)
    except CliError as error:
        print(f"flashsloth: error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
