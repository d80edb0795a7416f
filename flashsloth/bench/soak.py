"""
Reliability checks of a FlashSloth checkpoint.

`flashsloth check-memory --model DIR` (or `python -m flashsloth.bench.soak check-memory --model DIR`) runs many
varied `image-text-to-text` pipeline calls (images of many sizes and aspect ratios, one or two images, text only,
batches, plain prompts) and reports the process's resident memory after a warm-up and at the end as JSON. Memory that
keeps growing after the warm-up is a leak; the check fails (exit code 2) above `--max-growth` percent.
"""

import argparse
import gc
import json
import os
import sys
import time

from ..cli_errors import EXIT_USAGE_ERROR, CliError

REQUEST_KINDS = ("one-image", "two-images", "text-only", "batch", "plain-prompt")


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-memory",
        help="Report memory growth over many varied pipeline calls (a leak check).",
        description=__doc__.strip().split("\n\n")[1],
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR_OR_REPO", help="Checkpoint folder or Hub repository to load."
    )
    parser.add_argument("--calls", type=int, default=300, help="Pipeline calls in all (default: %(default)s).")
    parser.add_argument(
        "--warmup", type=int, default=30, help="Calls before the reference measurement (default: %(default)s)."
    )
    parser.add_argument(
        "--max-growth",
        type=float,
        default=5.0,
        help="Largest allowed growth of resident memory after the warm-up, in percent (default: %(default)s).",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=4, help="Tokens generated per request (default: %(default)s)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random requests (default: %(default)s).")
    parser.add_argument("--output", metavar="FILE", help="Also write the JSON report to FILE.")
    parser.set_defaults(handler=run_check_memory)


def resident_memory_bytes() -> int:
    """The process's current resident set size (Linux `/proc/self/statm`; elsewhere the peak, from `resource`)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def random_image(rng):
    """A noise image of random size and aspect ratio (8 to 640 pixels a side)."""
    from PIL import Image

    width, height = (int(side) for side in rng.integers(8, 641, size=2))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype="uint8"))


def chat(text: str, images: list) -> list[dict]:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def make_request(kind: str, rng) -> tuple[dict, int]:
    """Pipeline keyword arguments for one request of `kind`, and the number of conversations it holds."""
    words = ["What", "is", "in", "the", "picture", "describe", "colour", "shape", "left", "right", "count"]
    question = " ".join(rng.choice(words, size=int(rng.integers(1, 12)))) + "?"
    if kind == "one-image":
        return {"text": chat(question, [random_image(rng)])}, 1
    if kind == "two-images":
        return {"text": chat(question, [random_image(rng), random_image(rng)])}, 1
    if kind == "text-only":
        return {"text": chat(question, [])}, 1
    if kind == "batch":
        size = int(rng.integers(2, 5))
        conversations = [chat(question, [random_image(rng)] * int(rng.integers(0, 3))) for _ in range(size)]
        return {"text": conversations, "batch_size": int(rng.integers(1, size + 1))}, size
    return {"text": f"USER: <image>\n{question}<learnable> ASSISTANT:", "images": [random_image(rng)]}, 1


def check_memory(
    model: str, calls: int = 300, warmup: int = 30, max_new_tokens: int = 4, seed: int = 0, max_growth: float = 5.0
) -> dict:
    """
    Run `calls` varied pipeline requests on `model` and measure resident memory after `warmup` of them and at the end.

    Returns the report: `rss_start_mib` (after loading), `rss_after_warmup_mib`, `rss_end_mib`, `growth_percent`
    (end against warm-up), `passed` (growth at most `max_growth`), the counts of requests of each kind, and versions.
    """
    import numpy as np
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import pipeline

    if not 0 < warmup < calls:
        raise ValueError(f"--warmup must lie between 0 and --calls ({calls}), got {warmup}.")
    start_time = time.perf_counter()
    pipe = pipeline("image-text-to-text", model=model, trust_remote_code=True)
    generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    rng = np.random.default_rng(seed)
    gc.collect()
    rss_start = resident_memory_bytes()
    rss_after_warmup = None
    kinds = dict.fromkeys(REQUEST_KINDS, 0)
    conversations = 0
    with torch.inference_mode():
        for index in tqdm(range(calls), desc="pipeline calls", disable=None):
            kind = REQUEST_KINDS[index % len(REQUEST_KINDS)]
            request, count = make_request(kind, rng)
            outputs = pipe(**request, generate_kwargs=generate_kwargs)
            if len(outputs) != count:
                raise RuntimeError(f"The pipeline answered {len(outputs)} of {count} conversations ({kind}).")
            kinds[kind] += 1
            conversations += count
            if index + 1 == warmup:
                gc.collect()
                rss_after_warmup = resident_memory_bytes()
    gc.collect()
    rss_end = resident_memory_bytes()
    growth = 100 * (rss_end - rss_after_warmup) / rss_after_warmup
    mebibyte = 2**20
    return {
        "model": str(model),
        "calls": calls,
        "warmup_calls": warmup,
        "conversations": conversations,
        "requests_per_kind": kinds,
        "rss_start_mib": round(rss_start / mebibyte, 1),
        "rss_after_warmup_mib": round(rss_after_warmup / mebibyte, 1),
        "rss_end_mib": round(rss_end / mebibyte, 1),
        "growth_percent": round(growth, 2),
        "max_growth_percent": max_growth,
        "passed": growth <= max_growth,
        "seconds": round(time.perf_counter() - start_time, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run_check_memory(args: argparse.Namespace) -> None:
    if args.calls < 2 or args.max_new_tokens < 1:
        raise CliError("--calls must be at least 2 and --max-new-tokens at least 1")
    if os.path.sep in args.model and not os.path.isdir(args.model):
        raise CliError(f"model folder not found: {args.model}")
    try:
        report = check_memory(args.model, args.calls, args.warmup, args.max_new_tokens, args.seed, args.max_growth)
    except ValueError as error:
        raise CliError(str(error).splitlines()[0]) from error
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as output:
            output.write(text + "\n")
    if not report["passed"]:
        raise CliError(
            f"resident memory grew {report['growth_percent']}% after the warm-up, more than --max-growth "
            f"{args.max_growth}%"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashsloth.bench.soak", description=__doc__.strip().split("\n\n")[0]
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except CliError as error:
        print(f"flashsloth: error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
