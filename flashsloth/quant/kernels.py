"""
`flashsloth quant-bench --kernels`: the CPU kernels behind each weights format, timed on one Phi-2 MLP matrix
(2560 -> 10240) with 1 row (a decoding step) and with the prompt's rows (a prefill). Each path computes the same
product as fp32 `F.linear`; its deviation from fp32 is reported next to its time. The times say how fast a format
can decode at best on this CPU: a decoding step reads every decoder matrix once, so the kernel's time for this matrix
times the decoder's weights over its weights is the floor of the decoder's share of a token.
"""

import statistics
import time


PHI2_MLP_SHAPE = (10240, 2560)  # out, in features of Phi-2's fc1
PHI2_DECODER_MATRICES = 32 * (4 * 2560 * 2560 + 2 * 2560 * 10240) / (2560 * 10240)  # 96 of these matrices' weights


def _time_ms(function, inputs, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(2):
            function(inputs)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            function(inputs)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def kernel_paths():
    """(name, activation dtype, build) of every timed path; `build(linear)` returns the callable to time."""
    import torch

    def plain(linear):
        return linear

    def int8(compiled):
        def build(linear):
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(linear, Int8WeightOnlyConfig())
            return torch.compile(linear) if compiled else linear

        return build

    def int4(linear):
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        from . import INT4_GROUP_SIZE

        quantize_(linear, PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE))
        return linear

    return [
        ("fp32", torch.float32, plain),
        ("bf16", torch.bfloat16, plain),
        ("int8 eager (torchao)", torch.bfloat16, int8(False)),
        ("int8 compiled (packed kernel)", torch.bfloat16, int8(True)),
        ("int4 (tinygemm CPU kernel)", torch.bfloat16, int4),
    ]


def time_kernels(rows=(1, 140), repeats: int = 10, threads: int = 2, shape=PHI2_MLP_SHAPE, seed: int = 0) -> dict:
    """Median ms of every path of `kernel_paths` for each row count, and the max relative deviation from fp32."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    inputs = {count: torch.randn(1, count, in_features, generator=generator) for count in rows}
    with torch.inference_mode():
        reference = {count: torch.nn.functional.linear(x, weight) for count, x in inputs.items()}
    results = []
    for name, dtype, build in kernel_paths():
        linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        function = build(linear)
        for count, x in inputs.items():
            x = x.to(dtype)
            with torch.inference_mode():
                output = function(x).float()
            deviation = ((output - reference[count]).abs().max() / reference[count].abs().max()).item()
            results.append({"path": name, "rows": count, "ms": _time_ms(function, x, repeats), "max_rel": deviation})
    return {"shape": list(shape), "threads": threads, "repeats": repeats, "results": results}


def format_kernels(report: dict) -> str:
    rows = sorted({result["rows"] for result in report["results"]})
    paths = list(dict.fromkeys(result["path"] for result in report["results"]))
    by_key = {(result["path"], result["rows"]): result for result in report["results"]}
    out_features, in_features = report["shape"]
    lines = [
        f"One {out_features} x {in_features} matrix (Phi-2's MLP), {report['threads']} threads, median ms of "
        f"{report['repeats']}; `decode floor` is the 1-row time x {PHI2_DECODER_MATRICES:.0f}, Phi-2's decoder weights "
        "in matrices of this size: the least time per token of the decoder's products with this kernel.",
        "",
        "| path | "
        + " | ".join(f"{count} row{'s' if count > 1 else ''} ms" for count in rows)
        + " | decode floor ms | max rel vs fp32 |",
        "|---|" + "---:|" * (len(rows) + 2),
    ]
    for path in paths:
        times = " | ".join(f"{by_key[(path, count)]['ms']:.1f}" for count in rows)
        floor = by_key[(path, rows[0])]["ms"] * PHI2_DECODER_MATRICES if rows[0] == 1 else float("nan")
        deviation = max(by_key[(path, count)]["max_rel"] for count in rows)
        lines.append(f"| {path} | {times} | {floor:.0f} | {deviation:.4f} |")
    return "\n".join(lines) + "\n"
