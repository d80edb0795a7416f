"""`flashsloth serve` (the OpenAI-compatible server and its web page) and `flashsloth serve-bench` (its load test)."""

import argparse
import os

from ..cli_errors import CliError
from ..cli import ATTENTION_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES
from ..demo import DEMO_MODEL_DIR


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=str(DEMO_MODEL_DIR),
        metavar="DIR_OR_REPO",
        help="Checkpoint folder or Hub repository of a FlashSloth model and processor (loaded with "
        "trust_remote_code=True). Default: the embedded demo model, which only knows scenes of coloured shapes.",
    )
    parser.add_argument(
        "--served-model-name",
        help="The model id clients pass as `model` and /v1/models lists (default: the model folder's name).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to listen on (default: %(default)s, this machine only; 0.0.0.0 opens it to the network).",
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s; 0 picks a free one).")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Weights dtype: 'auto' keeps the checkpoint's (default: %(default)s).",
    )
    parser.add_argument("--device", help="Torch device, e.g. cpu, cuda (default: cuda when available, else cpu).")
    parser.add_argument(
        "--attn",
        choices=ATTENTION_CHOICES,
        default="sdpa",
        help="Attention implementation (default: %(default)s).",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="Quantize the weights while loading, as `flashsloth ask --quantize` does (see docs/quantization.md; "
        "default: no quantization).",
    )
    batching = parser.add_argument_group("batching")
    batching.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="Most requests in one batched generate call; 1 turns batching off (default: %(default)s).",
    )
    batching.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="How long the first request of a batch waits for others to join (default: %(default)s).",
    )
    batching.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="Requests waiting beyond this get 503 'server busy' (default: %(default)s).",
    )
    limits = parser.add_argument_group("limits on requests (a request beyond one gets a 4xx error)")
    limits.add_argument(
        "--max-tokens-cap",
        type=int,
        default=512,
        help="Largest max_tokens a request may ask for, and the default (default: %(default)s).",
    )
    limits.add_argument(
        "--max-body-mb", type=float, default=16.0, help="Largest request body in MiB (default: %(default)s)."
    )
    limits.add_argument("--max-images", type=int, default=8, help="Most images per request (default: %(default)s).")
    limits.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="Most pixels per image, checked before decoding it (default: %(default)s).",
    )
    limits.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="Download http(s) image URLs (off by default: the server then reaches out to any address "
        "a client names). data: URLs always work.",
    )
    # For the tests: slows every decoding step so that a request is still running while they look at it.
    parser.add_argument("--step-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="uvicorn's log level (default: %(default)s).",
    )


def add_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="Serve a model over an OpenAI-compatible HTTP API (batching concurrent requests) and a web page.",
        description="Serve a FlashSloth model over HTTP: POST /v1/chat/completions (OpenAI chat format, text and "
        "image_url parts, stream=true for server-sent events), GET /v1/models, GET /health, and a web page at / to "
        "ask about an image. Requests that arrive together run as one batched generate call. Needs the `serve` "
        "extra: pip install 'flashsloth[serve]'. See docs/serving.md.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)

    bench = subparsers.add_parser(
        "serve-bench",
        help="Load-test `flashsloth serve`: concurrent clients, answers checked against one-at-a-time answers.",
        description="Start `flashsloth serve` on a free port of 127.0.0.1 (or use --url), send every request one at "
        "a time, then from concurrent clients (batched, and with batching off), check that every answer equals its "
        "one-at-a-time answer, and report latency percentiles, throughput and the server's peak memory as a table, "
        "JSON and a PNG chart (when matplotlib is installed).",
    )
    from .load_test import add_arguments

    add_arguments(bench)
    bench.set_defaults(handler=run_serve_bench)


def model_name_of(model: str) -> str:
    """The id a model is served under: its Hub repository, its folder's name, or `flashsloth-demo`."""
    if not os.path.isdir(model):
        return model
    if os.path.realpath(model) == os.path.realpath(DEMO_MODEL_DIR):
        return "flashsloth-demo"
    return os.path.basename(os.path.normpath(model))


def build_server(args: argparse.Namespace):
    """Load the model and build the FastAPI app and its batching engine from `flashsloth serve`'s arguments."""
    try:
        from .app import ServerConfig, create_app
        from .batching import BatchingEngine
        from .protocol import Limits
    except ImportError as error:
        raise CliError(
            f"{error}; `flashsloth serve` needs FastAPI and uvicorn: pip install 'flashsloth[serve]'"
        ) from error
    from ..cli import Assistant

    for name in ("max_batch_size", "max_queue", "max_tokens_cap", "max_images", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_body_mb <= 0 or args.batch_window_ms < 0:
        raise CliError("--max-body-mb must be positive and --batch-window-ms not negative")
    loader = argparse.Namespace(**vars(args))
    loader.__dict__.update(max_new_tokens=args.max_tokens_cap, temperature=0.0, compile=False, hd=None)
    assistant = Assistant(loader)
    model, processor = assistant.model, assistant.processor
    context = model.config.get_text_config().max_position_embeddings
    tokenizer_limit = getattr(processor.tokenizer, "model_max_length", None)
    if tokenizer_limit is not None and tokenizer_limit < context:
        context = tokenizer_limit
    limits = Limits(
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_image_bytes=int(args.max_body_mb * 2**20),
        max_tokens_cap=args.max_tokens_cap,
        allow_remote_images=args.allow_remote_images,
    )
    config = ServerConfig(
        model_name=args.served_model_name or model_name_of(args.model),
        context_length=context,
        limits=limits,
        max_body_bytes=int(args.max_body_mb * 2**20),
        processor_kwargs=assistant.processor_kwargs,
    )
    engine = BatchingEngine(
        model,
        processor,
        max_batch_size=args.max_batch_size,
        batch_window=args.batch_window_ms / 1000,
        max_queue=args.max_queue,
        step_delay=args.step_delay_ms / 1000,
    )
    return create_app(engine, config), config


def run_serve(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    app, config = build_server(args)
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        for listener in server.servers:
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                # Tests and scripts read this line to find the port (with --port 0).
                print(f"flashsloth serve: {config.model_name} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)

    server.startup = startup
    server.run()


def run_serve_bench(args: argparse.Namespace) -> None:
    from .load_test import run

    run(args)
