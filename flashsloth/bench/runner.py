"""The benchmark run: its settings, the order of the timed cases, and the medians and advantages they give."""

import os
import platform
import time
from dataclasses import asdict, dataclass, field

from .counting import (
    cache_tensor_bytes,
    count_generation_operators,
    count_prefill_flops,
    kv_cache_bytes,
    parameter_bytes,
)
from .report import evaluate_goals, peers_in
from .timing import median_or_none, profile_generation, time_prefill_parts, timed_generate
from .workloads import (
    ADVANTAGE_KEYS,
    MODEL_NAMES,
    SIZE_SPECS,
    SIZES,
    TILED_PEER,
    VARIANT_CROPS,
    VARIANTS,
    PromptLayout,
    build_inputs,
    build_models,
    build_tiled_peer,
    build_tiled_peer_inputs,
    move_inputs,
    visual_tokens,
)


@dataclass
class BenchmarkSettings:
    size: str = "tiny"
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str = "auto"  # float32 on cpu, bfloat16 on cuda
    attn_implementation: str = "sdpa"
    compile: bool = False
    variants: tuple[str, ...] = VARIANTS
    tiled_peer: bool = False  # also time the SmolVLM-sized peer (base variant, batch 1)
    repeats: int = 3
    long_repeats: int = 1
    batch_repeats: int = 1
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    short_new_tokens: int = 8
    long_new_tokens: int = 128
    threads: int | None = None
    seed: int = 0
    profile_dir: str | None = None  # where to write a profile of one short answer per model (base variant)
    layout: PromptLayout = field(default_factory=PromptLayout)

    def validate(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}; got {self.size!r}.")
        if not self.variants or any(variant not in VARIANTS for variant in self.variants):
            raise ValueError(f"variants must be a non-empty subset of {', '.join(VARIANTS)}; got {self.variants}.")
        if self.repeats < 1 or self.long_repeats < 0 or self.batch_repeats < 1:
            raise ValueError("repeats and batch repeats must be at least 1, long repeats at least 0.")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive; got {self.batch_sizes}.")
        if self.short_new_tokens < 2 or (self.long_new_tokens and self.long_new_tokens <= self.short_new_tokens):
            raise ValueError(
                "short answers need at least 2 new tokens (one decoding step) and long answers more than short ones "
                f"(or 0 to skip them); got {self.short_new_tokens} and {self.long_new_tokens}."
            )


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def resolve_device_and_dtype(settings: BenchmarkSettings):
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu.")
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


def generation_kwargs(config, settings: BenchmarkSettings, device) -> dict:
    """The same greedy settings for every model: exactly the asked number of tokens, placeholders never generated.
    `config` is the config of the model that generates."""
    from transformers import CompileConfig

    placeholder_ids = [config.image_token_id, getattr(config, "query_token_id", None)]
    kwargs = {
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": config.text_config.pad_token_id or 0,
        "suppress_tokens": [token_id for token_id in placeholder_ids if token_id is not None],
    }
    if settings.compile:
        import torch

        mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
        compile_config = CompileConfig(mode=mode)
        compile_config._compile_all_devices = True  # generate() compiles on its own only on accelerators
        # A prefill chunk at least as long as any prompt: generate() then runs the whole prefill through the compiled
        # forward too (on a static cache it initialises ahead of the trace), one graph per prompt shape.
        kwargs.update(
            cache_implementation="static",
            compile_config=compile_config,
            prefill_chunk_size=config.text_config.max_position_embeddings,
        )
    return kwargs


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_description(device) -> dict:
    import torch
    import transformers

    description = {
        "platform": platform.platform(),
        "cpu": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.device(device).type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


@dataclass
class RunPlan:
    """What a benchmark run measures, in order. A case is `(variant, model name)`; a timed run is `(phase, variant,
    model name, batch size, new tokens)` with phase `short`, `long` or `batch`."""

    cases: list
    main_variant: str
    timed: list
    warmups: list
    profiled: list
    batch_sizes: list


def plan_runs(settings: BenchmarkSettings) -> RunPlan:
    """
    The cases and runs of a benchmark: short answers at batch 1 over every case, long answers at batch 1 and short
    answers at each batch size above 1 over the main variant, each interleaved over its rounds; the untimed warm-up
    generations (compiled: every shape to be timed, so that compilation stays out of the timings; eager: one batch-1
    short answer per case); the profiled cases.
    """
    short, long = settings.short_new_tokens, settings.long_new_tokens
    main_variant = "base" if "base" in settings.variants else settings.variants[0]
    cases = [(variant, name) for variant in settings.variants for name in MODEL_NAMES]
    if settings.tiled_peer:
        cases.insert(cases.index((main_variant, "peer")) + 1, (main_variant, TILED_PEER))
    main_cases = [(variant, name) for variant, name in cases if variant == main_variant]
    batched_cases = [(main_variant, name) for name in MODEL_NAMES]
    batch_sizes = sorted(batch for batch in set(settings.batch_sizes) if batch > 1)

    timed = [("short", variant, name, 1, short) for variant, name in _interleaved(cases, settings.repeats)]
    if long:
        timed += [("long", variant, name, 1, long) for variant, name in _interleaved(main_cases, settings.long_repeats)]
    for batch_size in batch_sizes:
        timed += [
            ("batch", variant, name, batch_size, short)
            for variant, name in _interleaved(batched_cases, settings.batch_repeats)
        ]
    # The first call of a shape pays one-time costs (compilation; on a GPU also library set-up, 5x a warm eager call).
    if settings.compile:
        warmups = sorted({run[1:] for run in timed}, key=str)
    else:
        warmups = [(variant, name, 1, short) for variant, name in cases]
    profiled = main_cases if settings.profile_dir else []
    return RunPlan(cases, main_variant, timed, warmups, profiled, batch_sizes)


# Generation settings that compile; operators are counted on the eager path.
COMPILE_KWARGS = ("cache_implementation", "compile_config", "prefill_chunk_size")


def count_case(model, model_config, name: str, variant: str, inputs: dict, dtype, generation_kwargs: dict) -> dict:
    """One case's counted figures: tokens, prefill FLOPs and operators (one prefill under the FLOP counter, which also
    warms it up), the operators `generate` dispatches for its prefill and per decoding step, KV-cache bytes (by
    formula and as filled) and weight bytes."""
    flops, part_flops, operators, cache = count_prefill_flops(model, inputs)
    length = inputs["input_ids"].shape[1]
    eager_kwargs = {key: value for key, value in generation_kwargs.items() if key not in COMPILE_KWARGS}
    generate_operators = count_generation_operators(model, inputs, eager_kwargs)
    return dict(
        visual_tokens=visual_tokens(model_config, name, VARIANT_CROPS[variant]),
        prompt_tokens=length,
        prefill_flops=flops,
        prefill_operators=operators,
        generate_prefill_operators=generate_operators["prefill"],
        decode_step_operators=generate_operators["decode_step"],
        prefill_flops_by_part=part_flops,
        kv_cache_bytes=kv_cache_bytes(model_config.text_config, length, dtype),
        kv_cache_bytes_measured=cache_tensor_bytes(cache),
        weight_bytes=parameter_bytes(model),
    )


def time_case_parts(model, inputs: dict, entry: dict, repeats: int, device) -> None:
    """Add the prefill's parts to a case's entry: seconds per part and the GFLOP/s each part reached."""
    entry["prefill_parts_s"] = time_prefill_parts(model, inputs, repeats, device)
    entry["prefill_gflops_per_s"] = {
        part: flops / entry["prefill_parts_s"][part] / 1e9
        for part, flops in entry["prefill_flops_by_part"].items()
        if entry["prefill_parts_s"][part] > 0
    }


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """
    Run the whole benchmark and return its results as a JSON-ready dict (see `format_markdown`):

    1. per model and variant, one prefill under torch's FLOP counter and the operators of a one- and a two-token
       answer ([`count_case`]), then the untimed warm-ups;
    2. the prefill split into its parts (vision tower, decoder layers, head; FlashSloth's SAP and EmbQ), timed by
       module hooks: `repeats` times for FlashSloth, once for the peers;
    3. the timed runs of [`plan_runs`]: time to first token, response time, decode speed, throughput;
    4. with `profile_dir`, one short answer per model of the main variant under torch's profiler.

    The SmolVLM-sized peer (`tiled_peer`) runs in one variant only, base unless HD runs alone (its tiling does not depend
    on the image size), and at batch 1 only (17 tiles per image make large batches slow on a CPU).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device, dtype = resolve_device_and_dtype(settings)
    if settings.size == "full" and torch.device(device).type == "cpu":
        logger.warning("The full-size models on CPU take minutes per prefill; `--size small` keeps the proportions.")

    started = time.perf_counter()
    flashsloth, peer = build_models(settings.size, dtype, device, settings.attn_implementation, settings.seed)
    models = {"flashsloth": flashsloth, "peer": peer}
    if settings.tiled_peer:
        models[TILED_PEER] = build_tiled_peer(settings.size, dtype, device, settings.attn_implementation, settings.seed)
    # The uncompressed peer's geometry is FlashSloth's, read from FlashSloth's config; the tiled peer has its own.
    model_configs = {name: models[name].config if name == TILED_PEER else flashsloth.config for name in models}
    gen_kwargs = {name: generation_kwargs(model.config, settings, device) for name, model in models.items()}
    short, long = settings.short_new_tokens, settings.long_new_tokens
    plan = plan_runs(settings)
    inputs_cache = {}

    def inputs_for(variant: str, name: str, batch_size: int = 1) -> dict:
        key = (variant, name, batch_size)
        if key not in inputs_cache:
            if name == TILED_PEER:
                built = build_tiled_peer_inputs(model_configs[name], batch_size, settings.layout, seed=settings.seed)
            else:
                num_crops = VARIANT_CROPS[variant]
                built = build_inputs(
                    flashsloth.config, name, num_crops, batch_size, settings.layout, seed=settings.seed
                )
            inputs_cache[key] = move_inputs(built, device, dtype)
        return inputs_cache[key]

    total = 2 * len(plan.cases) + len(plan.warmups) + len(plan.timed) + len(plan.profiled)
    progress = tqdm(total=total, desc=f"bench {settings.size}")
    results = {variant: {} for variant in settings.variants}
    for variant, name in plan.cases:
        inputs = inputs_for(variant, name)
        results[variant][name] = count_case(
            models[name], model_configs[name], name, variant, inputs, dtype, gen_kwargs[name]
        )
        progress.update()
    for variant, name, batch_size, new_tokens in plan.warmups:
        timed_generate(models[name], inputs_for(variant, name, batch_size), new_tokens, gen_kwargs[name], device)
        progress.update()
    for variant, name in plan.cases:
        # FlashSloth's parts give a goal (SAP + EmbQ share), the peers' only explain their prefills: timed once.
        repeats = settings.repeats if name == "flashsloth" else 1
        time_case_parts(models[name], inputs_for(variant, name), results[variant][name], repeats, device)
        progress.update()

    records = {}
    for phase, variant, name, batch_size, new_tokens in plan.timed:
        run = timed_generate(models[name], inputs_for(variant, name, batch_size), new_tokens, gen_kwargs[name], device)
        records.setdefault((phase, variant, name, batch_size), []).append(run)
        progress.update()
    profiles = {}
    for variant, name in plan.profiled:
        path_stem = os.path.join(settings.profile_dir, f"{settings.size}_{variant}_{name}")
        profiles[name] = profile_generation(
            models[name], inputs_for(variant, name), short, gen_kwargs[name], device, path_stem
        )
        progress.update()
    progress.close()

    for variant, name in plan.cases:
        entry = results[variant][name]
        entry.update(
            summarize_runs(
                records.get(("short", variant, name, 1), []),
                records.get(("long", variant, name, 1), []),
                {batch: records.get(("batch", variant, name, batch), []) for batch in plan.batch_sizes},
                short,
                long,
                include_batch_one=1 in settings.batch_sizes,
            )
        )
        entry["peak_memory_bytes"] = entry["weight_bytes"] + entry.pop("peak_extra_bytes")
        entry["peak_memory_bytes_by_batch"] = {
            batch: entry["weight_bytes"] + extra for batch, extra in entry.pop("peak_extra_bytes_by_batch").items()
        }
    for variant in settings.variants:
        for peer_name in peers_in(results[variant]):
            results[variant][ADVANTAGE_KEYS[peer_name]] = compute_advantages(results[variant], short, long, peer_name)

    report = {
        "size": settings.size,
        "size_description": SIZE_SPECS[settings.size].description,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": settings.attn_implementation,
        "compile": settings.compile,
        "settings": {
            key: value for key, value in asdict(settings).items() if key not in ("size", "device", "dtype", "compile")
        },
        "machine": _machine_description(device),
        "duration_s": time.perf_counter() - started,
        "variants": results,
    }
    if profiles:
        report["profile"] = {"variant": plan.main_variant, "new_tokens": short, "models": profiles}
    report["goals"] = evaluate_goals(report)
    logger.info("Benchmark of size %s done.", settings.size)
    return report


def _interleaved(cases: list, rounds: int) -> list:
    """Every case once per round, every other round in reverse order, so that drifts in machine load cancel out."""
    return [case for round_index in range(rounds) for case in (cases if round_index % 2 == 0 else cases[::-1])]


def summarize_runs(
    short_runs: list, long_runs: list, batch_runs: dict, short: int, long: int, include_batch_one: bool = True
) -> dict:
    """Medians of one model's runs: time to first token, response times, decode speed, throughput, peak memory."""
    summary = {
        "ttft_s": median_or_none([run.arrivals[0] for run in short_runs]),
        f"response_{short}_s": median_or_none([run.arrivals[-1] for run in short_runs]),
    }
    decode_runs = long_runs or short_runs
    summary["decode_ms_per_token"] = median_or_none(
        [1000 * (run.arrivals[-1] - run.arrivals[0]) / (len(run.arrivals) - 1) for run in decode_runs]
    )
    if long and long_runs:
        summary[f"response_{long}_s"] = median_or_none([run.arrivals[-1] for run in long_runs])
    throughput = {"1": short / summary[f"response_{short}_s"]} if include_batch_one else {}
    for batch_size, runs in batch_runs.items():
        if runs:
            throughput[str(batch_size)] = batch_size * short / median_or_none([run.arrivals[-1] for run in runs])
    summary["throughput_tokens_per_s"] = throughput
    summary["peak_extra_bytes"] = max(run.peak_extra_bytes for run in short_runs + long_runs)
    summary["peak_extra_bytes_by_batch"] = {
        str(batch_size): max(run.peak_extra_bytes for run in runs) for batch_size, runs in batch_runs.items() if runs
    }
    summary["samples_s"] = {
        "ttft": [run.arrivals[0] for run in short_runs],
        f"response_{short}": [run.arrivals[-1] for run in short_runs],
        f"response_{long}": [run.arrivals[-1] for run in long_runs],
        **{
            f"batch_{batch}_response_{short}": [run.arrivals[-1] for run in runs]
            for batch, runs in batch_runs.items()
            if runs
        },
    }
    return summary


def compute_advantages(variant_results: dict, short: int, long: int, peer_name: str = "peer") -> dict:
    """How many times better FlashSloth is than a peer on each metric (peer / FlashSloth, or FlashSloth / peer for
    throughput)."""
    ours, peer = variant_results["flashsloth"], variant_results[peer_name]
    advantage = {}
    for key in (
        "visual_tokens",
        "prompt_tokens",
        "prefill_flops",
        "prefill_operators",
        "generate_prefill_operators",
        "decode_step_operators",
        "kv_cache_bytes",
        "ttft_s",
        "decode_ms_per_token",
    ):
        advantage[key] = peer[key] / ours[key]
    for key in (f"response_{short}_s", f"response_{long}_s", "peak_memory_bytes"):
        if key in ours:
            advantage[key] = peer[key] / ours[key]
    advantage["throughput_tokens_per_s"] = {
        batch: ours["throughput_tokens_per_s"][batch] / peer["throughput_tokens_per_s"][batch]
        for batch in ours["throughput_tokens_per_s"]
        if batch in peer["throughput_tokens_per_s"]
    }
    return advantage
