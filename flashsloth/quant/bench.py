"""
`flashsloth quant-bench`: FlashSloth and its uncompressed 729-token peer on the CPU in fp32, bf16 and the quantized
formats, side by side: load time, time to first token, decode time per token, the 8-token response, peak resident
memory and the deviation of the first-step logits from fp32.

The benchmark's random-weight FlashSloth (`flashsloth.bench`, same configs, prompt and inputs) is saved once as a
safetensors checkpoint; then every weights format loads it in a fresh process (`flashsloth.quant.worker`), straight
into the quantized form through `from_pretrained(quantization_config=...)`, so that each peak memory is its own. The
peer shares every weight of the loaded FlashSloth, so it runs in the same process, after it.

    flashsloth quant-bench --size tiny
    flashsloth quant-bench --size full --json docs/quant_cpu.json --markdown docs/quant_cpu.md --plot docs/quant_cpu.png
    flashsloth quant-bench --kernels --markdown docs/quant_kernels_cpu.md
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from ..bench.report import write_report
from .worker import FORMATS


DEFAULT_FORMATS = ("fp32", "bf16", "int8", "int4")

GOALS = {"decode_ms": 150.0, "ttft_s": 5.0, "peak_rss_gb": 4.0}  # issue #30, at 2 threads on the 2-core machine

BITS = {"fp32": 32, "bf16": 16, "int8": 8, "int8-dynamic": 8, "int4": 4}


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--size",
        choices=("tiny", "small", "full"),
        default="tiny",
        help="Model size of the speed benchmark: tiny (a quick check), small (full widths, 1/8 depth) or full "
        "(SigLIP so400m + Phi-2, 3.2B parameters, ~13 GB in fp32; run one at a time) (default: %(default)s).",
    )
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"Comma-separated weights formats, from {', '.join(FORMATS)}; fp32 always runs first, as the "
        "reference of the logit deviations (default: %(default)s).",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s).")
    parser.add_argument(
        "--new-tokens", type=int, default=8, help="Tokens per response, always all generated (default: %(default)s)."
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="Timed runs per model and format; medians are reported (default: 1)."
    )
    parser.add_argument(
        "--warmup",
        action="store_true",
        help="Generate 2 tokens before the timed runs (reported as the first call: page faults of the mapped "
        "checkpoint, int8's compilation), so that the timed runs are warm.",
    )
    parser.add_argument(
        "--checkpoint-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="dtype of the saved random checkpoint that every format loads: bf16, as Hub checkpoints usually are "
        "(half the bytes to read, half the page cache while loading), or fp32 (default: %(default)s).",
    )
    parser.add_argument(
        "--no-peer-formats",
        default="",
        metavar="FORMATS",
        help="Comma-separated formats for which only FlashSloth runs (the peer's 779-token prefill is the longest "
        "part; e.g. bf16 on a CPU without AVX512-BF16) (default: none).",
    )
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=15.5,
        help="Memory bandwidth of the machine in GB/s; the decode limit is the decoder's weight bytes over it "
        "(default: %(default)s, measured on the project's 2-core machine).",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="Folder kept for the random checkpoint, the fp32 logits and each format's result (default: a temporary "
        "one, removed at the end).",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="With --workdir: reuse the results already there (e.g. after an interrupted full run) and measure only "
        "the missing formats.",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="Time only the CPU kernels of each format on one Phi-2 MLP matrix, 1 row and --kernel-rows rows, and "
        "print each one's floor for a decoding step (flashsloth.quant.kernels; a minute).",
    )
    parser.add_argument(
        "--kernel-rows", type=int, default=140, help="Rows of the prefill case of --kernels (default: %(default)s)."
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="Write every measurement as JSON.")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="Write the table as markdown.")
    parser.add_argument("--plot", default=None, metavar="PATH", help="Draw a PNG chart (needs matplotlib).")
    return parser


def add_commands(subparsers) -> None:
    description = (__doc__ or "").strip().split("\n\n")[0]
    parser = subparsers.add_parser(
        "quant-bench", help="CPU benchmark of fp32, bf16 and quantized weights.", description=description
    )
    configure_parser(parser)
    parser.set_defaults(handler=run_quant_bench)
    from .quality import add_commands as add_quality_commands

    add_quality_commands(subparsers)


def parse_formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ValueError(f"--formats: unknown {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return ["fp32"] + [name for name in formats if name != "fp32"]


def _worker(arguments: list[str], log_path: str) -> None:
    command = [sys.executable, "-m", "flashsloth.quant.worker", *arguments]
    with open(log_path, "a") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{tail}")


def run_benchmark(args: argparse.Namespace) -> dict:
    """Prepare the checkpoint, measure every format in its own process, and return the report."""
    formats = parse_formats(args.formats)
    workdir = args.workdir or tempfile.mkdtemp(prefix="flashsloth-quant-bench-")
    os.makedirs(workdir, exist_ok=True)
    checkpoint = os.path.join(workdir, f"random-{args.size}-{args.checkpoint_dtype}")
    log_path = os.path.join(workdir, "workers.log")
    report = {
        "size": args.size,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "checkpoint_dtype": args.checkpoint_dtype,
        "bandwidth_gbs": args.bandwidth_gbs,
        "goals": GOALS,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "results": [],
    }
    started = time.perf_counter()
    try:
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            _worker(
                ["prepare", "--size", args.size, "--checkpoint", checkpoint, "--dtype", args.checkpoint_dtype], log_path
            )
        for weights in formats:
            output = os.path.join(workdir, f"{weights}.json")
            if args.resume and os.path.isfile(output):
                with open(output) as result:
                    report["results"].append(json.load(result))
                continue
            _worker(
                [
                    "measure",
                    "--size", args.size,
                    "--checkpoint", checkpoint,
                    "--scheme", weights,
                    "--threads", str(args.threads),
                    "--new-tokens", str(args.new_tokens),
                    "--repeats", str(args.repeats),
                    "--logits-dir", workdir,
                    "--output", output,
                    *(["--warmup"] if args.warmup else []),
                    *(["--no-peer"] if weights in args.no_peer_formats.split(",") else []),
                ],
                log_path,
            )  # fmt: skip
            with open(output) as result:
                report["results"].append(json.load(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    for result in report["results"]:
        result["decode_limit_ms"] = result["decode_weight_bytes"] / (args.bandwidth_gbs * 1e9) * 1e3
    return report


def table_rows(report: dict) -> list[dict]:
    rows = []
    for result in report["results"]:
        for name, model in result["models"].items():
            rows.append(
                {
                    "format": result["scheme"],
                    "model": "FlashSloth" if name == "flashsloth" else "peer (729 tokens)",
                    "prompt_tokens": model["prompt_tokens"],
                    "load_s": result["load_s"],
                    "ttft_s": model["ttft_s"],
                    "decode_ms": model["decode_s"] * 1e3,
                    "decode_limit_ms": result["decode_limit_ms"],
                    "response_s": model["response_s"],
                    "first_call_s": model.get("warmup_response_s", float("nan")),
                    "peak_rss_gb": model["peak_rss_bytes"] / 1e9,
                    "loaded_rss_gb": result.get("rss_after_load_bytes", float("nan")) / 1e9,
                    "peak_anon_gb": model.get("peak_anon_rss_bytes", float("nan")) / 1e9,
                    "logit_max_rel": model.get("logit_max_rel"),
                    "logit_mean_rel": model.get("logit_mean_rel"),
                    "top1_equal": model.get("top1_equal"),
                    "tokens": model["tokens"],
                }
            )
    return rows


def _deviation(value) -> str:
    return "reference" if value is None else f"{value:.4f}"


def _optional(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"  # NaN: not recorded by the run that measured this format


def format_markdown(report: dict) -> str:
    goals = report["goals"]
    rows = table_rows(report)
    reference_tokens = {row["model"]: row["tokens"] for row in rows if row["format"] == "fp32"}
    # Above the benchmark's own threads (plus a margin), other work shared the cores.
    shared = max(report["loadavg_start"][0], report["loadavg_end"][0]) > report["threads"] + 0.5
    warmup = "a 2-token warm-up call" if report.get("warmup") else "no warm-up"
    lines = [
        f"CPU, {report['threads']} threads, size `{report['size']}`, {report['new_tokens']}-token greedy responses, "
        f"medians of {report['repeats']} run(s) after {warmup}, from a {report.get('checkpoint_dtype', 'fp32')} "
        f"checkpoint; load average {report['loadavg_start'][0]:.1f} at the start, "
        f"{report['loadavg_end'][0]:.1f} at the end ("
        + ("the machine is shared: times are disturbed)." if shared else "no other work on the machine)."),
        "",
        f"Goals: decode <= {goals['decode_ms']:.0f} ms/token, TTFT <= {goals['ttft_s']:.0f} s, peak RSS <= "
        f"{goals['peak_rss_gb']:.0f} GB. Decode limit: the bytes of the decoder and output-head weights read per "
        f"token over {report['bandwidth_gbs']} GB/s. Peak RSS is the kernel's `VmHWM`, which also counts the page cache "
        "of the mmap'd checkpoint read while loading; peak anon is the sampled anonymous part (tensors, heap); RSS "
        "loaded is the resident set once loaded. The peer's peaks start from the loaded weights (reset after "
        "FlashSloth's runs). First call: the warm-up's 2-token response (mapped pages read, int8's linears compiled).",
        "",
        "| format | model | prompt | load s | first call s | TTFT s (goal 5) | decode ms/token (goal 150) | "
        "decode limit ms | 8-token s | peak RSS GB (goal 4) | peak anon GB | RSS loaded GB | logits max rel | "
        "logits mean rel | top-1 = fp32 | tokens = fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        same_tokens = row["tokens"] == reference_tokens.get(row["model"])
        lines.append(
            f"| {row['format']} | {row['model']} | {row['prompt_tokens']} | {row['load_s']:.1f} | "
            f"{_optional(row['first_call_s'])} | {row['ttft_s']:.2f} | {row['decode_ms']:.0f} | "
            f"{row['decode_limit_ms']:.0f} | {row['response_s']:.2f} | "
            f"{row['peak_rss_gb']:.2f} | {_optional(row['peak_anon_gb'])} | {_optional(row['loaded_rss_gb'])} | "
            f"{_deviation(row['logit_max_rel'])} | {_deviation(row['logit_mean_rel'])} | "
            f"{'-' if row['top1_equal'] is None else ('yes' if row['top1_equal'] else 'no')} | "
            f"{'-' if row['format'] == 'fp32' else ('yes' if same_tokens else 'no')} |"
        )
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(report)
    formats = [result["scheme"] for result in report["results"]]
    models = ["FlashSloth", "peer (729 tokens)"]
    panels = [
        ("ttft_s", "time to first token (s)"),
        ("decode_ms", "decode (ms/token)"),
        ("peak_rss_gb", "peak RSS (GB)"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    width = 0.38
    for axis, (key, title) in zip(axes, panels):
        for offset, model in enumerate(models):
            values = [
                next((r[key] for r in rows if r["format"] == f and r["model"] == model), float("nan")) for f in formats
            ]
            positions = [index + (offset - 0.5) * width for index in range(len(formats))]
            axis.bar(positions, values, width, label=model)
        if key == "decode_ms":
            limits = [result["decode_limit_ms"] for result in report["results"]]
            axis.plot(range(len(formats)), limits, "k_", markersize=30, mew=2, label="bandwidth limit")
        goal = {"ttft_s": GOALS["ttft_s"], "decode_ms": GOALS["decode_ms"], "peak_rss_gb": GOALS["peak_rss_gb"]}[key]
        axis.axhline(goal, color="red", linestyle="--", linewidth=1, label="goal")
        axis.set_xticks(range(len(formats)), formats)
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.suptitle(f"FlashSloth on the CPU, {report['threads']} threads, size {report['size']}: weights formats")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_kernels(args: argparse.Namespace) -> None:
    from ..cli_errors import CliError
    from . import QuantizationUnavailableError, quantization_config
    from .kernels import format_kernels, time_kernels

    if args.kernel_rows < 2:
        raise CliError("--kernel-rows must be at least 2 (1 row is always timed)")
    try:
        quantization_config("int4", "cpu")
    except QuantizationUnavailableError as error:
        raise CliError(str(error)) from error
    report = time_kernels(rows=(1, args.kernel_rows), repeats=max(args.repeats, 10), threads=args.threads)
    write_report(report, format_kernels(report), args.json, args.markdown, indent=1)


def run_quant_bench(args: argparse.Namespace) -> None:
    from ..cli_errors import CliError

    try:
        parse_formats(args.formats)
    except ValueError as error:
        raise CliError(str(error)) from error
    if args.resume and not args.workdir:
        raise CliError("--resume needs --workdir, the folder of the earlier run")
    if args.threads < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise CliError("--threads and --repeats must be at least 1, --new-tokens at least 2")
    if args.kernels:
        run_kernels(args)
        return
    if "int8" in args.formats or "int4" in args.formats:
        from . import QuantizationUnavailableError, quantization_config

        try:
            quantization_config("int4" if "int4" in args.formats else "int8", "cpu")
        except QuantizationUnavailableError as error:
            raise CliError(str(error)) from error
    report = run_benchmark(args)
    write_report(report, format_markdown(report), args.json, args.markdown, indent=1)
    if args.plot:
        plot_report(report, args.plot)


def main(argv=None) -> int:
    from ..cli import main as cli_main

    return cli_main(["quant-bench", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
