"""Benchmark `flashsloth convert` on a synthetic full-size original-format checkpoint.

Writes a checkpoint with the released shapes (SigLIP so400m with 26 kept layers, Phi-2 with 32 layers, vocabulary
51200, float16, in shards like the Hub's), converts it with the `flashsloth convert` command in a child process and
reports the wall time and peak RSS (goal: at most 1.5x the largest source shard), then loads the converted model in
another child process and runs one forward pass on an image. Everything is written under a temporary folder that is
deleted at the end (unless --keep). Needs about 13 GB of disk; the weights are random.

    python -m flashsloth.conversion.benchmark [--workdir DIR] [--source-shard-size 5GB] [--keep]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


GIB = 1024**3
ORIGINAL_CONFIG = {
    "architectures": ["FlashSlothForCausalLM"],
    "model_type": "phi",
    "mm_vision_tower": "google/siglip-so400m-patch14-384",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "mlp2x_gelu",
    "mm_hidden_size": 1152,
    "image_aspect_ratio": "square",
    "image_hd": False,
    "tokenizer_model_max_length": 3072,
    "torch_dtype": "float16",
}
TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A red square on a white background.",
]
FORWARD_SCRIPT = """
import json, resource, sys, time
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
start = time.perf_counter()
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
loaded = time.perf_counter()
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt, return_tensors="pt")
with torch.inference_mode():
    logits = model(**inputs).logits
done = time.perf_counter()
print(json.dumps({
    "parameters": sum(parameter.numel() for parameter in model.parameters()),
    "load_s": loaded - start, "forward_s": done - loaded, "sequence_length": inputs["input_ids"].shape[1],
    "logits_finite": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape),
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""
CONVERT_SCRIPT = """
import json, resource, sys, time
from flashsloth.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"exit_code": code, "in_process_s": time.perf_counter() - start,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def original_key(native_name: str) -> str:
    """The original checkpoint name of a native FlashSloth tensor (the inverse of `ORIGINAL_KEY_MAPPING`)."""
    from .original_layout import ORIGINAL_KEY_MAPPING, convert_original_key

    best = None
    for pattern, replacement in ORIGINAL_KEY_MAPPING:
        exact = pattern.endswith("$")
        matches = native_name == replacement if exact else native_name.startswith(replacement)
        if matches and (best is None or len(replacement) > len(best[1])):
            best = (pattern, replacement)
    if best is None:
        raise KeyError(f"{native_name} has no original name")
    prefix = re.sub(r"\\(.)", r"\1", best[0].strip("^$"))
    name = prefix + native_name[len(best[1]) :]
    assert convert_original_key(name) == native_name, (name, native_name)
    return name


def full_size_layout():
    """(original name, shape) of every tensor of a released FlashSloth-3.2B checkpoint, and its original config."""
    import torch

    from flashsloth.configuration_flashsloth import PHI_2, FlashSlothConfig
    from flashsloth.modeling_flashsloth import FlashSlothForConditionalGeneration

    with torch.device("meta"):
        model = FlashSlothForConditionalGeneration(FlashSlothConfig())
    layout = [(original_key(name), tuple(tensor.shape)) for name, tensor in model.state_dict().items()]
    return layout, {**PHI_2, **ORIGINAL_CONFIG}


def synthetic_tokenizer():
    """A small byte-level BPE tokenizer (the conversion needs one; its size does not matter here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def random_tensor(name: str, shape: tuple[int, ...], dtype, seed: int):
    import torch

    if re.search(r"(norm|layernorm|layer_norm\d|ln_\w+)\.weight$", name):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(dtype)


def write_source(directory: Path, shard_size: str, tokenizer_dir: str | None) -> list[Path]:
    """The synthetic original-format checkpoint, written shard by shard and tensor by tensor."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from .shards import TargetTensor, plan_shards, write_index, write_safetensors

    layout, config = full_size_layout()
    dtype = torch.float16
    tensors = [TargetTensor(name, name, shape, dtype) for name, shape in layout]
    total = sum(tensor.nbytes for tensor in tensors)
    names = plan_shards(tensors, shard_size)
    directory.mkdir(parents=True)
    seeds = {tensor.name: index for index, tensor in enumerate(tensors)}
    with logging.tqdm(total=total, unit="B", unit_scale=True, desc="Writing the synthetic source") as progress:
        for filename, group in names.items():
            write_safetensors(
                directory / filename,
                group,
                load=lambda tensor: random_tensor(tensor.name, tensor.shape, dtype, seeds[tensor.name]),
                on_tensor=lambda tensor: progress.update(tensor.nbytes),
            )
    write_index(directory, names)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else synthetic_tokenizer()
    tokenizer.save_pretrained(directory)
    return [directory / filename for filename in names]


def run_child(script: str, *args: str) -> dict:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"The child process failed:\n{result.stderr[-4000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["wall_s"] = wall
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flashsloth.conversion.benchmark",
        description="Convert a synthetic full-size original-format FlashSloth checkpoint (SigLIP so400m 26 layers, "
        "Phi-2 32 layers, vocabulary 51200, float16) and report wall time and peak RSS, then load the result and run "
        "one forward pass. Needs about 13 GB of free disk.",
    )
    parser.add_argument(
        "--workdir", help="Folder for the source and converted checkpoints (default: a new temporary folder)."
    )
    parser.add_argument(
        "--source-shard-size",
        default="5GB",
        help="Largest source shard; 5GB gives two shards (5.0 + 1.4 GB), as save_pretrained made the Hub's "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--max-shard-size", default="2GB", help="Largest shard of the converted checkpoint (default: %(default)s)."
    )
    parser.add_argument(
        "--tokenizer", help="Tokenizer folder to put in the source (default: a small synthetic byte-level BPE)."
    )
    parser.add_argument(
        "--forward-dtype",
        choices=("bfloat16", "float32", "float16"),
        default="bfloat16",
        help="Dtype to load the converted model in for the forward pass (default: %(default)s).",
    )
    parser.add_argument("--skip-forward", action="store_true", help="Only convert; do not load the result.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints instead of deleting them.")
    parser.add_argument("--json", metavar="FILE", help="Also write the figures to this JSON file.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flashsloth-benchmark-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < 14 * GIB:
        raise SystemExit(f"{workdir} has {free / GIB:.1f} GiB free; the benchmark needs about 14 GiB.")
    source, target = workdir / "original", workdir / "converted"
    figures = {}
    try:
        start = time.perf_counter()
        shards = write_source(source, args.source_shard_size, args.tokenizer)
        figures["source_write_s"] = time.perf_counter() - start
        figures["source_shard_bytes"] = [shard.stat().st_size for shard in shards]
        largest = max(figures["source_shard_bytes"])

        arguments = ["convert", str(source), str(target), "--max-shard-size", args.max_shard_size]
        convert = run_child(CONVERT_SCRIPT, *arguments)
        figures["convert_wall_s"] = convert["wall_s"]
        figures["convert_in_process_s"] = convert["in_process_s"]
        figures["convert_peak_rss_bytes"] = convert["peak_rss_kib"] * 1024
        figures["peak_rss_over_largest_shard"] = figures["convert_peak_rss_bytes"] / largest
        figures["converted_files"] = sorted(path.name for path in target.iterdir())

        if not args.skip_forward:
            forward = run_child(FORWARD_SCRIPT, str(target), args.forward_dtype)
            if not forward["logits_finite"]:
                raise RuntimeError("The converted model's logits are not finite.")
            figures["forward"] = forward
    finally:
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)

    total = sum(figures["source_shard_bytes"])
    print(
        f"source: {len(shards)} shards, {total / 1e9:.2f} GB, largest {largest / 1e9:.2f} GB, "
        f"written in {figures['source_write_s']:.0f} s"
    )
    print(
        f"convert: {figures['convert_wall_s']:.0f} s wall ({figures['convert_in_process_s']:.0f} s in the command, "
        f"{total / figures['convert_in_process_s'] / 1e6:.0f} MB/s), "
        f"peak RSS {figures['convert_peak_rss_bytes'] / 1e9:.2f} GB "
        f"= {figures['peak_rss_over_largest_shard']:.2f}x the largest source shard (goal <= 1.5x)"
    )
    if "forward" in figures:
        forward = figures["forward"]
        print(
            f"forward ({args.forward_dtype}): {forward['parameters'] / 1e9:.2f}B parameters "
            f"loaded in {forward['load_s']:.0f} s, "
            f"one forward over {forward['sequence_length']} tokens in {forward['forward_s']:.0f} s, logits "
            f"{forward['logits_shape']} finite, peak RSS {forward['peak_rss_kib'] * 1024 / 1e9:.2f} GB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
