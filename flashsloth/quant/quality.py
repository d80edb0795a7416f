"""
`flashsloth quant-eval`: what quantization costs in quality. The embedded demo model's own exact-match eval
(`flashsloth.demo.evaluate`) in fp32 and every quantized format, and, on the parity fixtures' checkpoints (the
original-layout weights converted as tests/test_parity.py does), the greedy answer of each format against fp32's.

    flashsloth quant-eval --per-kind 100 --parity-dir ../shared/fixtures/parity --json scores.json
"""

import argparse
import json
import os
import sys
import tempfile
import zlib
from pathlib import Path


DEFAULT_FORMATS = ("int8", "int8-dynamic", "int4")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help="Comma-separated quantized formats to score against fp32 (default: %(default)s).",
    )
    parser.add_argument(
        "--per-kind",
        type=int,
        default=100,
        help="Demo-eval questions per kind (the demo's own eval uses 500) (default: %(default)s).",
    )
    parser.add_argument(
        "--parity-dir",
        default=None,
        help="Folder of the parity fixtures (base/, hd/ with keys.json, original_config.json, reference.*); "
        "skipped when not given.",
    )
    parser.add_argument("--steps", type=int, default=8, help="Greedy tokens per parity answer (default: 8).")
    parser.add_argument("--json", default=None, metavar="PATH", help="Write the scores as JSON.")
    return parser


def load_model(path, weights: str):
    """FlashSloth from `path` in fp32 or a quantized format of `flashsloth.quant.SCHEMES`, on the CPU."""
    import torch
    from transformers import AutoModelForImageTextToText

    from . import load_quantized

    if weights != "fp32":
        return load_quantized(path, weights, "cpu")
    return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def demo_scores(formats: list[str], per_kind: int) -> dict:
    """The demo eval's scores (overall and per kind, in %) of fp32 and each format."""
    from transformers import AutoProcessor

    from ..demo import DEMO_MODEL_DIR, evaluate

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    scores = {}
    for weights in ["fp32", *formats]:
        result = evaluate(load_model(DEMO_MODEL_DIR, weights), processor, per_kind=per_kind)
        scores[weights] = {
            "overall": 100 * result["overall"],
            "per_kind": {kind: 100 * value for kind, value in result["per_kind"].items()},
        }
    return {"per_kind_count": per_kind, "scores": scores}


def regenerate_original_state_dict(fixture_dir: Path) -> dict:
    """A parity fixture's original-format weights, regenerated from its `keys.json` by the fixture's seeded rule."""
    import torch

    state_dict = {}
    for name, shape, kind in json.loads((fixture_dir / "keys.json").read_text()):
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        state_dict[name] = 1.0 + 0.1 * noise if kind == "layernorm_weight" else 0.02 * noise
    return state_dict


def parity_inputs(fixture_dir: Path, config) -> dict:
    """The fixture's prompt with the placeholders expanded, as tests/parity_helpers.py builds it."""
    import torch
    from safetensors.torch import load_file

    reference = json.loads((fixture_dir / "reference.json").read_text())
    pixel_values = load_file(fixture_dir / "reference.safetensors")["pixel_values"].reshape(-1, 3, 384, 384)
    num_crops = pixel_values.shape[0]
    ids = []
    for token in reference["input_ids"]:
        if token == -200:
            ids += [config.image_token_id] * (config.image_tokens_per_crop * num_crops)
        elif token == 50295:
            ids += [config.query_token_id] * config.num_query_tokens
        else:
            ids.append(token)
    input_ids = torch.tensor([ids])
    positions = reference["positions"]
    instruction_mask = torch.zeros_like(input_ids)
    instruction_mask[0, positions["question_span_start"] : positions["question_span_end"]] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_num_crops": torch.tensor([num_crops]),
        "instruction_mask": instruction_mask,
    }


def parity_answers(parity_dir: str, formats: list[str], steps: int) -> dict:
    """For each fixture (base, hd): fp32's greedy tokens, each format's, how many agree, and the first-step logit
    deviation (max and mean relative)."""
    import torch

    from ..conversion.original_layout import convert_original_state_dict, flashsloth_config_from_original
    from ..modeling_flashsloth import FlashSlothForConditionalGeneration
    from . import finish_loading

    results = {}
    for name in ("base", "hd"):
        fixture_dir = Path(parity_dir) / name
        if not (fixture_dir / "keys.json").is_file():
            continue
        config = flashsloth_config_from_original(
            json.loads((fixture_dir / "original_config.json").read_text()),
            json.loads((fixture_dir / "vision_config.json").read_text()),
        )
        model = FlashSlothForConditionalGeneration(config).eval()
        model.load_state_dict(convert_original_state_dict(regenerate_original_state_dict(fixture_dir)), strict=True)
        inputs = parity_inputs(fixture_dir, config)
        fixture_result = {}
        with tempfile.TemporaryDirectory() as checkpoint:
            model.save_pretrained(checkpoint)
            for weights in ["fp32", *formats]:
                quantized = FlashSlothForConditionalGeneration.from_pretrained(checkpoint, **_class_load_kwargs(weights))
                quantized = finish_loading(quantized, weights, "cpu").eval() if weights != "fp32" else quantized.eval()
                batch = {**inputs, "pixel_values": inputs["pixel_values"].to(quantized.dtype)}
                with torch.inference_mode():
                    output = quantized.generate(
                        **batch,
                        max_new_tokens=steps,
                        min_new_tokens=steps,
                        do_sample=False,
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
                fixture_result[weights] = {
                    "tokens": output.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
                    "logits": output.logits[0][0].float(),
                }
        reference = fixture_result["fp32"]
        reference_logits = reference.pop("logits")
        top2 = reference_logits.topk(2).values
        # How close fp32's own first choice is: the gap between its two best logits over the largest |logit|.
        reference["top2_margin_rel"] = ((top2[0] - top2[1]) / reference_logits.abs().max()).item()
        for weights, result in fixture_result.items():
            pairs = list(zip(result["tokens"], reference["tokens"]))
            result["equal_tokens"] = sum(a == b for a, b in pairs)
            result["first_difference"] = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            if weights != "fp32":
                deviation = (result.pop("logits") - reference_logits).abs()
                result["logit_max_rel"] = (deviation.max() / reference_logits.abs().max()).item()
                result["logit_mean_rel"] = (deviation.mean() / reference_logits.abs().mean()).item()
        results[name] = fixture_result
    return results


def _class_load_kwargs(weights: str) -> dict:
    import torch

    from . import load_kwargs

    if weights == "fp32":
        return {"dtype": torch.float32}
    kwargs = load_kwargs(weights, "cpu")
    if kwargs["dtype"] == "auto":
        kwargs["dtype"] = torch.float32
    return kwargs


def format_markdown(report: dict) -> str:
    lines = []
    demo = report.get("demo")
    if demo:
        fp32 = demo["scores"]["fp32"]["overall"]
        kinds = list(demo["scores"]["fp32"]["per_kind"])
        lines += [
            f"Demo model, its own eval, {demo['per_kind_count']} questions per kind (exact match, %):",
            "",
            "| format | overall | vs fp32 | " + " | ".join(kinds) + " |",
            "|---|---:|---:|" + "---:|" * len(kinds),
        ]
        for weights, score in demo["scores"].items():
            per_kind = " | ".join(f"{score['per_kind'][kind]:.1f}" for kind in kinds)
            lines.append(f"| {weights} | {score['overall']:.2f} | {score['overall'] - fp32:+.2f} | {per_kind} |")
        lines.append("")
    for name, fixture in report.get("parity", {}).items():
        margin = fixture["fp32"].get("top2_margin_rel")
        lines += [
            f"Parity fixture `{name}` (converted original checkpoint), greedy tokens against fp32 (fp32's first-step "
            f"gap between its two best logits: {margin:.4f} of the largest |logit|):",
            "",
            "| format | tokens equal | first difference | logits max rel | logits mean rel |",
            "|---|---:|---:|---:|---:|",
        ]
        for weights, result in fixture.items():
            total = len(result["tokens"])
            first = "-" if result["first_difference"] is None else str(result["first_difference"])
            deviation = (
                "reference | reference"
                if weights == "fp32"
                else f"{result['logit_max_rel']:.4f} | {result['logit_mean_rel']:.4f}"
            )
            lines.append(f"| {weights} | {result['equal_tokens']}/{total} | {first} | {deviation} |")
        lines.append("")
    return "\n".join(lines)


def add_commands(subparsers) -> None:
    description = (__doc__ or "").strip().split("\n\n")[0]
    parser = subparsers.add_parser(
        "quant-eval", help="Quality of the quantized formats against fp32.", description=description
    )
    configure_parser(parser)
    parser.set_defaults(handler=run_quant_eval)


def run_quant_eval(args: argparse.Namespace) -> None:
    from ..cli_errors import CliError
    from . import check_scheme, quantization_config

    formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    try:
        for weights in formats:
            check_scheme(weights)
            quantization_config(weights, "cpu")
    except ValueError as error:
        raise CliError(str(error)) from error
    if args.parity_dir and not os.path.isdir(args.parity_dir):
        raise CliError(f"--parity-dir: no folder {args.parity_dir}")
    report = {"demo": demo_scores(formats, args.per_kind) if args.per_kind > 0 else None}
    if args.parity_dir:
        report["parity"] = parity_answers(args.parity_dir, formats, args.steps)
    print(format_markdown(report), end="")
    if args.json:
        with open(args.json, "w") as output:
            json.dump(report, output, indent=1)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["quant-eval", *sys.argv[1:]]))
