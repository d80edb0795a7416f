"""
Speed benchmark: FlashSloth side by side with an uncompressed peer built from the same encoder and language model.

The peer is transformers' native `LlavaForConditionalGeneration` with FlashSloth's own SigLIP, 2-layer GELU projector
and Phi (the Imp-v1-3B / Bunny-3B architecture): every 384x384 crop feeds all 27x27 = 729 patch features to the
language model, and for HD it gets FlashSloth-HD's 5 crops as 5 images (3645 tokens). Both models hold the same
random weights (the peer shares FlashSloth's modules, so one copy sits in memory), run in one process, interleaved,
after a warm-up, and every time is a median.

With `--smolvlm`, a second, tiled peer joins the base variant: transformers' native `SmolVLMForConditionalGeneration`
at the size of SmolVLM-Instruct (SigLIP so400m tiles, 3x3 pixel shuffle, SmolLM2-1.7B; random weights of its own) and
its processor's default tiling: the image's longest edge goes to 4 x 384 pixels, cut into 4 x 4 tiles, plus the whole
image as a 17th, 81 tokens each (1377).

    flashsloth bench --size small --json speed.json --markdown speed.md --plot speed.png
    python -m flashsloth.bench --size tiny

Sizes: `tiny` (a smoke test: the full token geometry with tiny widths), `overhead` (the full depths and token
geometry with tiny widths: operator counts and host time), `small` (the full widths and vocabulary with both depths
cut by 8, so vision and language keep their full-size share of the cost) and `full` (SigLIP so400m + Phi-2). torch and transformers are imported only when a benchmark runs, so that `flashsloth --help` stays instant.

Modules: `workloads` (sizes, models, prompts), `counting` (FLOPs, operators, bytes), `timing` (token clock, peak
memory, prefill parts), `runner` (the run and its medians), `report` (goals, table, chart), `cli` (the command), and
`soak` (`flashsloth check-memory`, the memory-growth check).
"""

from .cli import add_commands, configure_parser, main, run_bench
from .counting import count_prefill_flops, kv_cache_bytes, operator_counter, parameter_bytes
from .report import evaluate_goals, format_markdown, plot_report, table_rows
from .runner import BenchmarkSettings, compute_advantages, generation_kwargs, run_benchmark, summarize_runs
from .timing import PeakMemory, TokenClock, timed_generate
from .workloads import (
    MODEL_NAMES,
    SIZE_SPECS,
    SIZES,
    SMOLVLM_TOKEN_IDS,
    TILED_PEER,
    VARIANT_CROPS,
    VARIANTS,
    PromptLayout,
    benchmark_configs,
    build_inputs,
    build_models,
    build_tiled_peer,
    build_tiled_peer_inputs,
    tiled_peer_config,
)
