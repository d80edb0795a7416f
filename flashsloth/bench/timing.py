"""What the benchmark times: token timestamps through `generate`, peak memory, the prefill's parts, profiler traces."""

import ctypes
import ctypes.util
import gc
import statistics
import sys
import time
from dataclasses import dataclass

from .counting import prefill_parts

# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------


def _synchronize(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class TokenClock:
    """A `generate` streamer that records when each new token reaches the host (`generate` hands the prompt first)."""

    def __init__(self):
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


class PeakMemory:
    """
    Peak memory of a block above what was in use when it started: CUDA's max allocated, or on CPU the process's
    peak resident set (Linux: `VmHWM` after a reset through `/proc/self/clear_refs`, with freed heap memory handed
    back to the system first, so that it is not silently reused).
    """

    def __init__(self, device):
        import torch

        self.is_cuda = torch.device(device).type == "cuda"
        self.device = device
        self.extra_bytes = 0
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name and sys.platform.startswith("linux") else None

    @staticmethod
    def _status_kib(field_name: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise OSError(f"/proc/self/status has no {field_name}")

    def __enter__(self):
        import torch

        gc.collect()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current resident set
            self._before = self._status_kib("VmRSS") * 1024
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc_info):
        import torch

        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            self.extra_bytes = max(self._status_kib("VmHWM") * 1024 - self._before, 0)
        return False


@dataclass
class RunRecord:
    """Arrival time of every new token (seconds from the call to `generate`) and the run's peak extra memory."""

    arrivals: list[float]
    peak_extra_bytes: int


def timed_generate(model, inputs: dict, new_tokens: int, generation_kwargs: dict, device) -> RunRecord:
    import torch

    clock = TokenClock()
    with PeakMemory(device) as memory, torch.inference_mode():
        _synchronize(device)
        start = time.perf_counter()
        output_ids = model.generate(**inputs, max_new_tokens=new_tokens, streamer=clock, **generation_kwargs)
        _synchronize(device)
    generated = output_ids.shape[1] - inputs["input_ids"].shape[1]
    if generated != new_tokens or len(clock.arrivals) != new_tokens:
        raise RuntimeError(f"Asked for {new_tokens} new tokens, generate returned {generated}: timings would be wrong.")
    return RunRecord([arrival - start for arrival in clock.arrivals], memory.extra_bytes)


def profile_generation(model, inputs: dict, new_tokens: int, generation_kwargs: dict, device, path_stem: str) -> dict:
    """
    One answer under torch's profiler. Writes `<path_stem>.trace.json` (a Chrome trace: chrome://tracing or Perfetto)
    and `<path_stem>.txt` (the operators that took the most time). Returns the answer's wall time and, on a GPU, the
    time kernels and copies kept the device busy: far below the wall time, the host launching work is the limit.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        run = timed_generate(model, inputs, new_tokens, generation_kwargs, device)
    profiler.export_chrome_trace(f"{path_stem}.trace.json")
    operators = profiler.key_averages()
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    with open(f"{path_stem}.txt", "w") as file:
        file.write(operators.table(sort_by=sort_by, row_limit=40))
    summary = {"wall_s": run.arrivals[-1], "trace": f"{path_stem}.trace.json", "table": f"{path_stem}.txt"}
    if on_gpu:
        summary["device_busy_s"] = sum(operator.self_device_time_total for operator in operators) / 1e6
    return summary


def time_prefill_parts(model, inputs: dict, repeats: int, device) -> dict[str, float]:
    """
    Median seconds of a prefill forward pass and of its parts (see `prefill_parts`), timed by module hooks in a pass of
    their own (the hooks synchronize the device). For FlashSloth also the query-block layout EmbQ reads, timed alone.
    """
    import torch

    from ..modeling_flashsloth import build_query_block_layout

    parts = prefill_parts(model)
    spent = dict.fromkeys(parts, 0.0)
    started = {}

    def timing_hooks(part):
        def before(module, args):
            _synchronize(device)
            started[part] = time.perf_counter()

        def after(module, args, output):
            _synchronize(device)
            spent[part] += time.perf_counter() - started[part]

        return before, after

    handles = []
    for part, modules in parts.items():
        before, after = timing_hooks(part)
        for module in modules:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    samples = {name: [] for name in ("prefill", *parts)}
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                spent.update(dict.fromkeys(parts, 0.0))
                _synchronize(device)
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _synchronize(device)
                samples["prefill"].append(time.perf_counter() - start)
                for part in parts:
                    samples[part].append(spent[part])
                if "instruction_mask" in inputs:
                    start = time.perf_counter()
                    build_query_block_layout(
                        inputs["input_ids"], inputs["instruction_mask"], inputs["image_num_crops"], model.config
                    )
                    _synchronize(device)
                    samples.setdefault("layout", []).append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
