"""The benchmark's report: its goals, the markdown table and the PNG chart."""

import json
import sys
from dataclasses import asdict, dataclass

from .workloads import ADVANTAGE_KEYS, MODEL_LABELS, MODEL_NAMES, SMOLVLM_TILE_GRID, TILED_PEER, VARIANT_CROPS


def peers_in(variant_results: dict) -> list[str]:
    """The peers measured in one variant: the uncompressed peer, and the SmolVLM-sized one where it ran."""
    return [name for name in ("peer", TILED_PEER) if name in variant_results]


def sap_embq_share(parts: dict) -> float:
    """FlashSloth's own prefill work (SAP, EmbQ and the layout EmbQ reads) as a share of its prefill time."""
    return (parts["sap"] + parts["embq"] + parts["layout"]) / parts["prefill"]


@dataclass
class Goal:
    name: str
    measured: float
    target: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target


def evaluate_goals(report: dict) -> list[dict]:
    """The acceptance goals of the speed issue, on what this run measured."""
    goals = []
    variants = report["variants"]
    if report["size"] == "overhead":  # tiny widths: the times are dispatch and Python, the FLOP ceiling means nothing
        for variant, results in variants.items():
            advantage = results["advantage"]
            goals += [
                Goal(
                    f"{variant}: operators per prefill, peer / FlashSloth", advantage["generate_prefill_operators"], 1.0
                ),
                Goal(
                    f"{variant}: operators per decoding step, peer / FlashSloth",
                    advantage["decode_step_operators"],
                    1.0,
                ),
                Goal(f"{variant}: host time per prefill (TTFT), peer / FlashSloth", advantage["ttft_s"], 1.0),
            ]
    else:
        for variant, results in variants.items():
            advantage = results["advantage"]
            ratio = advantage["ttft_s"] / advantage["prefill_flops"]
            goals.append(Goal(f"{variant}: TTFT ratio / counted-FLOP ratio", ratio, 0.9))
    for variant, results in variants.items():
        share = sap_embq_share(results["flashsloth"]["prefill_parts_s"])
        goals.append(Goal(f"{variant}: SAP + EmbQ share of FlashSloth's prefill", share, 0.05, higher_is_better=False))
    for variant, results in variants.items():
        goals.append(
            Goal(f"{variant}: decode ms/token, peer / FlashSloth", results["advantage"]["decode_ms_per_token"], 1.0)
        )
    if "base" in variants:
        goals.append(
            Goal(
                "base: KV-cache bytes per sequence, peer / FlashSloth",
                variants["base"]["advantage"]["kv_cache_bytes"],
                5.0,
            )
        )
        throughput = variants["base"]["advantage"]["throughput_tokens_per_s"]
        largest = max(throughput, key=int, default="1")
        if int(largest) > 1:  # the goal is about batching: a run at batch 1 only has none
            goals.append(Goal(f"base: throughput at batch {largest}, FlashSloth / peer", throughput[largest], 2.0))
    if report["size"] == "full" and report["device"].startswith("cuda") and "base" in variants:
        ours, advantage = variants["base"]["flashsloth"], variants["base"]["advantage"]
        short = report["settings"]["short_new_tokens"]
        goals += [
            Goal(f"base: response ratio, {short} new tokens", advantage[f"response_{short}_s"], 2.4),
            Goal("base: decode tokens/s at batch 1", 1000 / ours["decode_ms_per_token"], 300.0),
            Goal("base: TTFT ms", 1000 * ours["ttft_s"], 15.0, higher_is_better=False),
            Goal("base: peak memory GB", ours["peak_memory_bytes"] / 1e9, 8.0, higher_is_better=False),
        ]
    return [{**asdict(goal), "met": goal.met} for goal in goals]


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------


def _format_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{1000 * seconds:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _format_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.2f} {unit}"
    return f"{count:,.0f} B"


def _format_ratio(value: float | None) -> str:
    return "–" if value is None else f"**{value:.2f}x**"


def _lookup(record: dict, path: tuple[str, ...]):
    """`record[path[0]][path[1]]...`, or None where a key is missing."""
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def table_rows(report: dict) -> list[tuple[str, list[str]]]:
    """
    The rows of the markdown table: a label, then per variant FlashSloth's value and, for each peer that ran in that
    variant, the peer's value and a comparison: FlashSloth's advantage as computed (`advantage`), the peer's value over
    FlashSloth's (`peer / ours`), FlashSloth's over the peer's (`ours / peer`), or nothing.
    """
    settings = report["settings"]
    short, long = settings["short_new_tokens"], settings["long_new_tokens"]
    variants = report["variants"]
    batches = sorted(
        {int(batch) for results in variants.values() for batch in results["flashsloth"]["throughput_tokens_per_s"]}
    )

    def comparison(results: dict, peer: str, path: tuple[str, ...], kind: str | None) -> str:
        ours, theirs = _lookup(results["flashsloth"], path), _lookup(results[peer], path)
        if kind == "advantage":
            return _format_ratio(_lookup(results[ADVANTAGE_KEYS[peer]], path))
        if kind is None or ours is None or theirs is None:
            return "" if kind is None else "–"
        return _format_ratio(theirs / ours) if kind == "peer / ours" else f"{ours / theirs:.2f}x"

    def row(path: tuple[str, ...], format_value, kind: str | None = "advantage") -> list[str]:
        cells = []
        for results in variants.values():
            for name in ("flashsloth", *peers_in(results)):
                value = _lookup(results[name], path)
                cells.append("–" if value is None else format_value(value))
                if name != "flashsloth":
                    cells.append(comparison(results, name, path, kind))
        return cells

    rows = [
        ("visual tokens per image", row(("visual_tokens",), "{:,}".format)),
        ("prompt tokens", row(("prompt_tokens",), "{:,}".format)),
        ("prefill GFLOPs (counted)", row(("prefill_flops",), lambda value: f"{value / 1e9:,.1f}")),
        ("prefill operators (non-view aten ops)", row(("prefill_operators",), "{:,}".format)),
        ("operators per prefill, through generate", row(("generate_prefill_operators",), "{:,}".format)),
        ("operators per decoding step, through generate", row(("decode_step_operators",), "{:,}".format)),
        ("time to first token", row(("ttft_s",), _format_ms)),
        ("decode per token", row(("decode_ms_per_token",), "{:,.1f} ms".format)),
        (f"response, {short} new tokens", row((f"response_{short}_s",), _format_ms)),
    ]
    if long:
        rows.append((f"response, {long} new tokens", row((f"response_{long}_s",), _format_ms)))
    rows += [
        ("KV cache per sequence (prompt)", row(("kv_cache_bytes",), _format_bytes)),
        ("peak memory, batch 1 (weights + run)", row(("peak_memory_bytes",), _format_bytes)),
    ]
    for batch in batches:
        label = f"throughput, batch {batch} (tokens/s, {short} new)"
        rows.append((label, row(("throughput_tokens_per_s", str(batch)), "{:,.2f}".format)))
    for batch in (batch for batch in batches if batch > 1):
        memory = row(("peak_memory_bytes_by_batch", str(batch)), _format_bytes, "peer / ours")
        rows.append((f"peak memory, batch {batch}", memory))
    for part, label in (("vision", "vision tower"), ("decoder", "decoder layers")):
        rows.append((f"prefill GFLOP/s, {label}", row(("prefill_gflops_per_s", part), "{:,.1f}".format, "ours / peer")))
    shares = []
    for results in variants.values():
        share = sap_embq_share(results["flashsloth"]["prefill_parts_s"])
        shares += [f"{100 * share:.2f}%"] + ["", ""] * len(peers_in(results))
    rows.append(("SAP + EmbQ share of prefill", shares))
    return rows


def format_markdown(report: dict) -> str:
    machine = report["machine"]
    hardware = (
        machine.get("gpu")
        or f"{machine['cpu']} ({machine['cpu_count']} cores, torch threads: {machine['torch_threads']})"
    )
    lines = [
        f"Size `{report['size']}` ({report['size_description']}); {report['device']}, {report['dtype']}, "
        f"{report['attn_implementation']}{', static cache + torch.compile' if report['compile'] else ''}; "
        f"{hardware}; torch {machine['torch']}, transformers {machine['transformers']}. Medians of "
        f"{report['settings']['repeats']} interleaved runs (long answers {report['settings']['long_repeats']}, "
        f"batches {report['settings']['batch_repeats']}); advantage = how many times better FlashSloth is.",
        "",
    ]
    header, separator = ["metric"], ["---"]
    for variant, results in report["variants"].items():
        crops = VARIANT_CROPS[variant]
        header.append("FlashSloth HD" if variant == "hd" else "FlashSloth")
        tiles = SMOLVLM_TILE_GRID**2 + 1
        peer_headers = {"peer": f"peer ({crops} x 729)", TILED_PEER: f"SmolVLM-sized ({tiles} tiles)"}
        for peer in peers_in(results):
            header += [peer_headers[peer], "advantage"]
        separator += ["---:"] * (1 + 2 * len(peers_in(results)))
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(separator) + "|"]
    for label, cells in table_rows(report):
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|:---:|"]
    for goal in report["goals"]:
        comparison = ">=" if goal["higher_is_better"] else "<="
        verdict = "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['name']} | {goal['measured']:.3f} | {comparison} {goal['target']:g} | {verdict} |")
    if "profile" in report:
        profile = report["profile"]
        lines += ["", f"Profiled: one {profile['new_tokens']}-token answer per model ({profile['variant']}).", ""]
        for name, summary in profile["models"].items():
            busy = ""
            if "device_busy_s" in summary:
                share = summary["device_busy_s"] / summary["wall_s"]
                busy = f"; device busy {_format_ms(summary['device_busy_s'])} ({share:.0%})"
            lines.append(f"- {name}: {_format_ms(summary['wall_s'])}{busy}; `{summary['table']}`, `{summary['trace']}`")
    return "\n".join(lines) + "\n"


def write_report(report: dict, markdown: str, json_path: str | None, markdown_path: str | None, indent: int = 2):
    """Print the markdown table, and write the report as JSON and the table to the paths given (None: not written)."""
    sys.stdout.write(markdown)
    if json_path:
        with open(json_path, "w") as file:
            json.dump(report, file, indent=indent)
    if markdown_path:
        with open(markdown_path, "w") as file:
            file.write(markdown)


def plot_report(report: dict, path: str):
    """A PNG like the paper's speed chart: time to first token and response times per model, throughput per batch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    settings = report["settings"]
    short, long = settings["short_new_tokens"], settings["long_new_tokens"]
    variants = report["variants"]
    colors = {"flashsloth": "#2a9d8f", "peer": "#b0b0b0", TILED_PEER: "#e9c46a"}
    figure, axes = pyplot.subplots(1, 3, figsize=(15, 4.5))

    # Left: per variant and metric a group of bars, FlashSloth's and each peer's, FlashSloth's advantage above a peer's.
    metrics = [("ttft_s", "TTFT"), (f"response_{short}_s", f"{short} tok")]
    if long:
        metrics.append((f"response_{long}_s", f"{long} tok"))
    groups = [
        (variant, key, label)
        for variant in variants
        for key, label in metrics
        if all(key in variants[variant][name] for name in MODEL_NAMES)
    ]
    labelled = set()
    for index, (variant, key, _) in enumerate(groups):
        names = ["flashsloth", *(peer for peer in peers_in(variants[variant]) if key in variants[variant][peer])]
        width = 0.8 / len(names)
        for position, name in enumerate(names):
            value = variants[variant][name][key]
            x = index - 0.4 + width * (position + 0.5)
            label = None if name in labelled else MODEL_LABELS[name]
            labelled.add(name)
            axes[0].bar(x, value, width, color=colors[name], label=label)
            if name != "flashsloth":
                advantage = variants[variant][ADVANTAGE_KEYS[name]][key]
                axes[0].annotate(f"{advantage:.1f}x", (x, value), ha="center", va="bottom", fontsize=8)
    axes[0].set_xticks(range(len(groups)), [f"{variant}\n{label}" for variant, _, label in groups], fontsize=8)
    axes[0].set_ylabel("seconds (batch 1)")
    axes[0].set_title("time to first token and response time")
    axes[0].set_ylim(top=1.35 * axes[0].get_ylim()[1])  # room for the legend above the bars
    axes[0].legend(fontsize=8, loc="upper right")

    names = [(variant, name) for variant in variants for name in ("flashsloth", *peers_in(variants[variant]))]
    axes[1].barh(
        [f"{MODEL_LABELS[name]} ({variant})" for variant, name in names],
        [variants[variant][name]["prefill_flops"] / 1e9 for variant, name in names],
        color=[colors[name] for _, name in names],
    )
    axes[1].set_xlabel("prefill GFLOPs (counted)")
    axes[1].set_title("prefill compute")

    for name in MODEL_NAMES:
        for variant in variants:
            throughput = variants[variant][name]["throughput_tokens_per_s"]
            if len(throughput) > 1:
                batches = sorted(throughput, key=int)
                axes[2].plot(
                    [int(batch) for batch in batches],
                    [throughput[batch] for batch in batches],
                    marker="o",
                    color=colors[name],
                    label=f"{MODEL_LABELS[name]} ({variant})",
                )
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks(
        sorted({int(batch) for line in variants.values() for batch in line["flashsloth"]["throughput_tokens_per_s"]})
    )
    axes[2].get_xaxis().set_major_formatter(ticker.ScalarFormatter())
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("batch size")
    axes[2].set_ylabel(f"generated tokens/s ({short} new tokens)")
    axes[2].set_title("throughput")
    if axes[2].lines:
        axes[2].legend()
    peers = "peers" if any(TILED_PEER in results for results in variants.values()) else "an uncompressed peer"
    figure.suptitle(f"FlashSloth vs {peers}: size {report['size']}, {report['device']}, {report['dtype']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
