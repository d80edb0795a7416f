"""
One measurement of `flashsloth quant-bench`, run in a process of its own so that peak memories do not mix: load the
random-weight checkpoint in one weights format (straight into the quantized form, through `from_pretrained`), then
time FlashSloth and its uncompressed 729-token peer (which shares every weight) on the benchmark's prompt.

    python -m flashsloth.quant.worker prepare --size tiny --checkpoint DIR
    python -m flashsloth.quant.worker measure --checkpoint DIR --scheme int4 --threads 2 --output result.json
"""

import argparse
import json
import os
import statistics
import sys
import time

from ..bench.timing import TokenClock


FORMATS = ("fp32", "bf16", "int8", "int8-dynamic", "int4")  # the benchmark's weights formats (`quant.SCHEMES` + dtypes)


def peak_rss_bytes() -> int:
    """The process's peak resident set since it started or since the last `reset_peak_rss` (Linux `VmHWM`)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, RssAnon, RssFile, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


class AnonymousPeak:
    """Samples the process's anonymous resident memory (`RssAnon`: heap and tensors, not the page cache of the
    mmap'd checkpoint, which `VmHWM` also counts) every `interval` seconds in a thread; `peak` is the largest seen
    since the last `reset`."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float):
        while not self._stop.wait(interval):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def reset(self):
        self.peak = status_bytes("RssAnon")

    def read(self) -> int:
        self.peak = max(self.peak, status_bytes("RssAnon"))
        return self.peak

    def stop(self):
        self._stop.set()


def reset_peak_rss() -> None:
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set


def tensor_bytes(tensor) -> int:
    """Bytes a (possibly torchao-quantized) tensor holds: the sum over its inner tensors for a tensor subclass."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def decode_weight_bytes(model) -> int:
    """Bytes of the weights every decoding step reads: the decoder layers, the final norm and the output head."""
    language_model = model.model.language_model
    modules = [language_model.layers, language_model.final_layernorm, model.lm_head]
    return sum(tensor_bytes(parameter) for module in modules for parameter in module.parameters())


def prepare(size: str, checkpoint: str, dtype: str = "fp32") -> None:
    """Save FlashSloth with the benchmark's random weights at `size` to the folder `checkpoint` (safetensors), in fp32
    or bf16 (`dtype`)."""
    import torch

    from ..bench import build_models

    flashsloth, _ = build_models(size, torch.float32, "cpu")
    flashsloth.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(checkpoint)


def load(checkpoint: str, weights: str):
    """FlashSlothForConditionalGeneration from `checkpoint` in one of `FORMATS`, quantized as it loads."""
    import torch

    from ..modeling_flashsloth import FlashSlothForConditionalGeneration
    from . import finish_loading, load_kwargs

    if weights in ("fp32", "bf16"):
        dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        return FlashSlothForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()
    kwargs = load_kwargs(weights, "cpu")
    if kwargs["dtype"] == "auto":
        kwargs["dtype"] = torch.float32
    model = FlashSlothForConditionalGeneration.from_pretrained(checkpoint, **kwargs)
    return finish_loading(model, weights, "cpu").eval()


def build_peer(flashsloth, size: str):
    """The native Llava peer sharing every module of the loaded (maybe quantized) FlashSloth, as the benchmark builds
    it (`flashsloth.bench.build_models`)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from ..bench.workloads import benchmark_configs, share_modules

    _, peer_config = benchmark_configs(size)
    with torch.device("meta"):
        peer = LlavaForConditionalGeneration._from_config(peer_config, dtype=flashsloth.dtype)
    return share_modules(flashsloth, peer).eval()


def time_generation(model, inputs: dict, new_tokens: int, repeats: int) -> dict:
    """Greedy `generate` of exactly `new_tokens` tokens, `repeats` times: median TTFT, decode time per token and
    whole response, the first run's tokens and its first-step logits (the prompt's last position)."""
    import torch

    runs, first = [], None
    for _ in range(repeats):
        clock = TokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                streamer=clock,
                output_logits=True,
                return_dict_in_generate=True,
            )
        end = time.perf_counter()
        gaps = [later - earlier for earlier, later in zip(clock.arrivals, clock.arrivals[1:])]
        runs.append(
            {"ttft_s": clock.arrivals[0] - start, "decode_s": statistics.median(gaps), "response_s": end - start}
        )
        if first is None:
            prompt = inputs["input_ids"].shape[1]
            first = {"tokens": output.sequences[0, prompt:].tolist(), "logits": output.logits[0][0].float().clone()}
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {**summary, "runs": runs, **first}


def measure(args: argparse.Namespace) -> dict:
    import torch

    from ..bench import PromptLayout, build_inputs

    torch.set_num_threads(args.threads)
    load_avg_start = os.getloadavg()
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    flashsloth = load(args.checkpoint, args.scheme)
    load_s = time.perf_counter() - start
    size = args.size
    peer = build_peer(flashsloth, size)
    result = {
        "scheme": args.scheme,
        "threads": args.threads,
        "load_s": load_s,
        "decode_weight_bytes": decode_weight_bytes(flashsloth),
        # Resident once loaded: all of it, and the part that is not file pages (the checkpoint's mmap is released).
        "rss_after_load_bytes": status_bytes("VmRSS"),
        "rss_anon_after_load_bytes": status_bytes("RssAnon"),
        "loadavg_start": load_avg_start,
        "models": {},
    }
    for name, model in (("flashsloth", flashsloth), ("peer", peer))[: 1 if args.no_peer else 2]:
        inputs = build_inputs(flashsloth.config, name, 1, 1, PromptLayout())
        inputs["pixel_values"] = inputs["pixel_values"].to(flashsloth.dtype)
        warmup = time_generation(model, inputs, 2, 1) if args.warmup else None
        timing = time_generation(model, inputs, args.new_tokens, args.repeats)
        if warmup is not None:  # the first call: page faults of the mmap'd weights, int8's compilation
            timing["warmup_response_s"] = warmup["response_s"]
        logits = timing.pop("logits")
        timing["prompt_tokens"] = inputs["input_ids"].shape[1]
        timing["peak_rss_bytes"] = peak_rss_bytes()  # FlashSloth's includes the load; the peer's starts from there
        timing["peak_anon_rss_bytes"] = anonymous.read()
        reference_path = os.path.join(args.logits_dir, f"{name}.pt")
        if args.scheme == "fp32":
            torch.save(logits, reference_path)
        else:
            ref = torch.load(reference_path, weights_only=True)
            deviation = (logits - ref).abs()
            timing["logit_max_rel"] = (deviation.max() / ref.abs().max()).item()
            timing["logit_mean_rel"] = (deviation.mean() / ref.abs().mean()).item()
            timing["top1_equal"] = bool(logits.argmax() == ref.argmax())
        result["models"][name] = timing
        reset_peak_rss()
        anonymous.reset()
    anonymous.stop()
    result["loadavg_end"] = os.getloadavg()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="One measurement of `flashsloth quant-bench` (run by it).")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="Save the random-weight checkpoint.")
    prepare_parser.add_argument("--size", required=True)
    prepare_parser.add_argument("--checkpoint", required=True)
    prepare_parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    measure_parser = commands.add_parser("measure", help="Load one weights format and time both models.")
    measure_parser.add_argument("--size", required=True)
    measure_parser.add_argument("--checkpoint", required=True)
    measure_parser.add_argument("--scheme", choices=FORMATS, required=True)
    measure_parser.add_argument("--threads", type=int, default=2)
    measure_parser.add_argument("--new-tokens", type=int, default=8)
    measure_parser.add_argument("--repeats", type=int, default=1)
    measure_parser.add_argument("--warmup", action="store_true")
    measure_parser.add_argument("--no-peer", action="store_true", help="time FlashSloth only")
    measure_parser.add_argument(
        "--logits-dir", required=True, help="where the fp32 run saves its logits and the others read them"
    )
    measure_parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.size, args.checkpoint, args.dtype)
        return 0
    result = measure(args)
    with open(args.output, "w") as output:
        json.dump(result, output, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
