"""`flashsloth bench` (and `python -m flashsloth.bench`): the command line of the speed benchmark."""

import argparse
import os
import sys

from ..cli_errors import CliError
from .report import format_markdown, plot_report, write_report
from .runner import BenchmarkSettings, run_benchmark
from .workloads import ATTENTION_CHOICES, DTYPE_CHOICES, SIZES, VARIANTS

# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny: smoke test (full token geometry, tiny widths); overhead: full depths and token geometry at tiny "
        "widths, for operator counts and host time; small: full widths and vocabulary, depths cut by 8 (CPU, "
        "minutes); full: SigLIP so400m + Phi-2 (GPU, or CPU slowly) (default: %(default)s).",
    )
    parser.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Weights and activations dtype; auto is float32 on CPU, bfloat16 on CUDA (default: %(default)s).",
    )
    parser.add_argument(
        "--attn",
        choices=ATTENTION_CHOICES,
        default="sdpa",
        help="Attention implementation of both models (default: %(default)s).",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Generate with a static KV cache and a torch.compile'd forward for the prefill and the decoding steps (CUDA "
        "graphs on a GPU; every shape is compiled before timing).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="base: one 384x384 crop per image (81+9 tokens vs 729); hd: 5 crops (405+9 vs 3645) (default: both).",
    )
    parser.add_argument(
        "--smolvlm",
        action="store_true",
        help="Also time a SmolVLM-sized native peer (transformers' SmolVLM: SigLIP so400m tiles, SmolLM2-1.7B) at its "
        "processor's default tiling, 4x4 tiles + the whole image = 1377 tokens; base variant (HD when it runs alone), "
        "batch 1, no goals.",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="Timed runs per model for time to first token, short answers and FlashSloth's SAP/EmbQ share (default: %(default)s).",
    )
    parser.add_argument(
        "--long-repeats",
        type=_non_negative_int,
        default=1,
        help="Timed long answers per model, at batch 1; they also give decode ms/token (default: %(default)s).",
    )
    parser.add_argument(
        "--batch-repeats",
        type=_positive_int,
        default=1,
        help="Timed runs per model at each batch size above 1 (default: %(default)s).",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=_positive_int,
        default=[1, 8, 32],
        help="Batch sizes of the throughput measurement, short answers, base variant (default: 1 8 32).",
    )
    parser.add_argument(
        "--short-new-tokens",
        type=_positive_int,
        default=8,
        help="Tokens of a short answer, the VQA case (default: %(default)s).",
    )
    parser.add_argument(
        "--long-new-tokens",
        type=_non_negative_int,
        default=128,
        help="Tokens of a long answer; 0 skips long answers (default: %(default)s).",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the random weights and inputs (default: %(default)s)."
    )
    parser.add_argument("--json", metavar="PATH", help="Write the full results (every sample, every ratio) as JSON.")
    parser.add_argument("--markdown", metavar="PATH", help="Write the markdown table (it is printed in any case).")
    parser.add_argument("--plot", metavar="PATH", help="Write a PNG chart (needs matplotlib: the `plot` extra).")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="After timing, profile one short answer per model (base variant) with torch's profiler: a Chrome trace and "
        "an operator table per model in DIR, and on a GPU how busy the device was.",
    )
    parser.set_defaults(handler=run_bench)
    return parser


BENCH_DESCRIPTION = (
    "Time FlashSloth against an uncompressed peer (transformers' Llava with the same SigLIP, projector and Phi, all "
    "729 patch tokens per crop): counted prefill FLOPs, time to first token, decode speed, short and long response "
    "times, throughput per batch size, KV-cache size and peak memory; optionally also against a SmolVLM-sized peer. "
    "Random weights; prints a markdown table."
)


def add_commands(subparsers):
    """Add `flashsloth bench`."""
    parser = subparsers.add_parser(
        "bench", help="Speed benchmark against an uncompressed peer.", description=BENCH_DESCRIPTION
    )
    configure_parser(parser)


def _settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn,
        compile=args.compile,
        variants=tuple(dict.fromkeys(args.variants)),
        tiled_peer=args.smolvlm,
        repeats=args.repeats,
        long_repeats=args.long_repeats,
        batch_repeats=args.batch_repeats,
        batch_sizes=tuple(args.batch_sizes),
        short_new_tokens=args.short_new_tokens,
        long_new_tokens=args.long_new_tokens,
        threads=args.threads,
        seed=args.seed,
        profile_dir=args.profile,
    )


def run_bench(args: argparse.Namespace) -> None:
    settings = _settings_from_args(args)
    try:
        settings.validate()
    except ValueError as error:
        raise CliError(str(error)) from error
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as error:
            raise CliError("--plot needs matplotlib: pip install 'flashsloth[plot]' (or matplotlib)") from error
    for path in (args.json, args.markdown, args.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CliError(f"the folder of {path} does not exist")
    if args.profile and not os.path.isdir(args.profile):
        raise CliError(f"--profile {args.profile}: no such folder; create it first")
    try:
        report = run_benchmark(settings)
    except (ValueError, ImportError) as error:
        raise CliError(str(error).splitlines()[0]) from error
    write_report(report, format_markdown(report), args.json, args.markdown)
    if args.plot:
        plot_report(report, args.plot)


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="python -m flashsloth.bench", description=BENCH_DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except CliError as error:
        print(f"flashsloth bench: error: {error}", file=sys.stderr)
        return 2
    return 0
