"""
Quantized FlashSloth weights through transformers' own integrations: torchao (`TorchAoConfig`) on the CPU or a GPU,
bitsandbytes (`BitsAndBytesConfig`, the QLoRA path) on CUDA only. No kernels of our own: this module only picks the
configuration, the dtype it needs and the modules that stay unquantized, and says clearly when a request cannot work.

    from flashsloth.quant import load_quantized
    model = load_quantized(path, "int4", "cpu")  # from_pretrained(..., **load_kwargs("int4", "cpu")) + finish_loading

`flashsloth ask/chat --quantize SCHEME` use the same functions; `flashsloth quant-bench` (`flashsloth.quant.bench`)
measures every scheme on the full-size model on the CPU. See docs/quantization.md.
"""

import importlib.util
import os
import shutil


# Scheme names of `--quantize`, with what each one is.
SCHEMES = {
    "int8": "torchao int8 weight-only, per output channel (Int8WeightOnlyConfig); CPU (bfloat16 activations, linear "
    "layers compiled to the packed int8 kernel) or CUDA",
    "int8-dynamic": "torchao int8 dynamic activation + int8 weight (Int8DynamicActivationInt8WeightConfig); CPU or CUDA",
    "int4": "torchao int4 weight-only, groups of 128, bfloat16 activations (CPU: the tinygemm CPU kernel "
    "_weight_int4pack_mm_for_cpu through PrototypeInt4WeightOnlyConfig; CUDA: Int4WeightOnlyConfig, tile-packed)",
    "bnb-8bit": "bitsandbytes LLM.int8() (BitsAndBytesConfig(load_in_8bit=True)); CUDA only",
    "bnb-4bit": "bitsandbytes NF4 with bfloat16 compute, the QLoRA format (BitsAndBytesConfig(load_in_4bit=True)); "
    "CUDA only",
}


# Modules kept in the checkpoint's dtype (transformers' `modules_to_not_convert`; names as in
# FlashSlothForConditionalGeneration). They hold under 1% of the weights at full size, so quantizing them saves almost
# nothing, while SAP's scoring layer has a single output (no int4 packing fits it) and the output head sets every
# logit (quantizing it doubled the demo model's logit deviation, docs/quantization.md). The vision patch embedding is
# a Conv2d, which torchao's configs leave alone anyway; layers whose width does not split into int4 groups of 128
# (SigLIP's MLP output layer, 4304 inputs) are skipped by torchao itself and stay in bfloat16.
MODULES_TO_NOT_CONVERT = (
    "model.spatial_pooling",
    "model.multi_modal_projector",
    "model.embedded_query",
    "lm_head",
)


INT4_GROUP_SIZE = 128


# The image path (SigLIP, SAP, projector): with --quantize int8 or int4 on the CPU it stays unquantized and goes back to
# fp32 once loaded (`finish_loading`), while the language model computes in bfloat16. The int4 kernel and the packed
# int8 kernel take bfloat16 activations, but a CPU without AVX512-BF16 or AMX runs bfloat16 matrix products several
# times slower than fp32 (measured 7x at 128 rows, docs/quantization.md), and the prefill of 729 patches through SigLIP
# is compute-bound; decoding never reads these weights.
CPU_FP32_MODULES = ("model.vision_tower", "model.spatial_pooling", "model.multi_modal_projector")
CPU_BF16_SCHEMES = ("int8", "int4")


class QuantizationUnavailableError(ValueError):
    """A quantization scheme that cannot run here (package missing, kernel missing, no CUDA), with what to do instead."""


def _device_type(device) -> str:
    return str(device or "cpu").split(":")[0]


def _require_torchao(scheme: str):
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationUnavailableError(
            f"--quantize {scheme} needs torchao: install it with `pip install -e \".[quant]\"` (or `pip install "
            "torchao`), or run without quantization."
        )


def _require_cuda(scheme: str, device_type: str):
    import torch

    if device_type != "cuda" or not torch.cuda.is_available():
        where = "no CUDA GPU is available" if not torch.cuda.is_available() else f"the device is {device_type!r}"
        raise QuantizationUnavailableError(
            f"--quantize {scheme} (bitsandbytes) runs on a CUDA GPU only, and {where}: choose --quantize int8 or "
            "int4 (torchao, which runs on the CPU), or run on a GPU with --device cuda."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            f"--quantize {scheme} needs bitsandbytes: install it with `pip install bitsandbytes`, or choose --quantize "
            "int8 or int4 (torchao)."
        )


def has_int4_cpu_kernel() -> bool:
    """Whether this PyTorch build has the int4 weight-only CPU kernel that `--quantize int4` uses on the CPU."""
    import torch

    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def check_scheme(scheme: str) -> None:
    """Raise a `ValueError` naming the known schemes when `scheme` is not one of them."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


def quantization_config(scheme: str, device: str = "cpu"):
    """
    The transformers quantization config of `scheme` (one of `SCHEMES`) for a model that will run on `device`
    ("cpu", "cuda", "cuda:1", ...), to pass as `from_pretrained(..., quantization_config=...)`. It keeps
    `MODULES_TO_NOT_CONVERT` unquantized. Raises `QuantizationUnavailableError` (a `ValueError`) when the scheme cannot
    run there, saying what to install or choose instead, and `ValueError` for an unknown scheme.

    Load with the dtype of `scheme_dtype(scheme, device)`, or use `load_kwargs`, which gives both.
    """
    check_scheme(scheme)
    device_type = _device_type(device)
    if scheme.startswith("bnb-"):
        _require_cuda(scheme, device_type)
        import torch
        from transformers import BitsAndBytesConfig

        skip = list(MODULES_TO_NOT_CONVERT)
        if scheme == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )

    _require_torchao(scheme)
    from transformers import TorchAoConfig

    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig()
    elif scheme == "int8-dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        config = Int8DynamicActivationInt8WeightConfig()
    elif device_type == "cpu":
        import torch

        if not has_int4_cpu_kernel():
            raise QuantizationUnavailableError(
                f"--quantize int4 on the CPU needs PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu), missing "
                f"from torch {torch.__version__}: upgrade torch (2.6 or newer), or choose --quantize int8."
            )
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    elif device_type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    else:
        raise QuantizationUnavailableError(
            f"--quantize int4 has kernels for the CPU and CUDA, not for {device_type!r}: choose --quantize int8, or "
            "--device cpu."
        )
    skip = list(MODULES_TO_NOT_CONVERT)
    if scheme in CPU_BF16_SCHEMES and device_type == "cpu":
        skip += [name for name in CPU_FP32_MODULES if name not in skip]
    return TorchAoConfig(config, modules_to_not_convert=skip)


def scheme_dtype(scheme: str, device: str = "cpu"):
    """The weights dtype `scheme` needs on `device`, or None where any dtype works (the checkpoint's is kept)."""
    import torch

    check_scheme(scheme)
    # int4 kernels take bfloat16 activations only, and so does the CPU's packed int8 kernel; bitsandbytes computes in
    # bfloat16 (4-bit) or needs a half dtype.
    if scheme == "int4" or scheme.startswith("bnb-") or (scheme == "int8" and _device_type(device) == "cpu"):
        return torch.bfloat16
    return None


def load_kwargs(scheme: str, device: str = "cpu", dtype=None) -> dict:
    """
    Keyword arguments of `from_pretrained` that load a checkpoint quantized with `scheme` for `device`:
    `quantization_config`, `dtype` (the scheme's, else `dtype`, else "auto") and, for bitsandbytes, `device_map`
    (its weights are quantized as they land on the GPU).
    """
    config = quantization_config(scheme, device)
    needed = scheme_dtype(scheme, device)
    if needed is not None and dtype not in (None, "auto", needed):
        from transformers.utils import logging  # here, not at the top: `flashsloth --help` imports this package

        logging.get_logger(__name__).warning(
            f"--quantize {scheme} computes in {needed}; the requested dtype {dtype} is not used"
        )
    kwargs = {"quantization_config": config, "dtype": needed or dtype or "auto"}
    if scheme.startswith("bnb-"):
        kwargs["device_map"] = device
    return kwargs


def compile_quantized_linears(model) -> int:
    """
    Compile every torchao-quantized `nn.Linear` of `model` with inductor, module by module (`nn.Module.compile`), and
    return how many. Eagerly, torchao's int8 weight-only linear rebuilds its whole weight on every call; compiled with
    bfloat16 inputs, inductor lowers it to PyTorch's packed int8 kernel (`_weight_int8pack_mm`): one token through a
    Phi-2 MLP matrix takes 2.8 ms instead of 33.5 (docs/quant_kernels_cpu.md). The modules share their graphs, one
    per weight shape for one row and one for any number of rows, compiled on first use in a few seconds. Inductor
    needs a C++ compiler on the CPU; without one the model stays eager, with a warning.
    """
    import torch
    from transformers.utils import logging

    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        logging.get_logger(__name__).warning(
            f"--quantize int8 on the CPU compiles its linear layers, which needs a C++ compiler, and {compiler!r} is "
            "not installed: int8 runs eagerly, many times slower. Install g++ (apt install g++) or use --quantize int4."
        )
        return 0
    quantized = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight).__module__.startswith("torchao")
    ]
    # Every weight shape is a graph of its own (two with the 1-row one): a model has a few, but a process holding
    # several models (quant-eval, a server's model and its draft) passed Dynamo's default of 8 and ran the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in quantized:
        module.compile()
    return len(quantized)


def release_checkpoint_mapping(model) -> int:
    """
    Copy every plain (unquantized) parameter and buffer of `model` that may still be a view of the memory-mapped
    safetensors checkpoint into memory of its own, and return how many were copied (tied tensors stay tied). Tensors
    whose dtype the loading did not change stay views of the mapping, which keeps the whole checkpoint file resident
    once every page was read: loaded from a bf16 checkpoint, int4 held 9.2 GB resident instead of 3.9.
    """
    import torch

    copies, count = {}, 0
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
                if tensor is None or not plain or tensor.device.type != "cpu":
                    continue
                key = tensor.data_ptr()
                if key not in copies:
                    copies[key] = tensor.data.clone()
                    count += 1
                tensor.data = copies[key]
    return count


def trim_heap() -> None:
    """Give the heap memory that loading freed back to the system (glibc's `malloc_trim`; nothing elsewhere). Loading
    int8 from a bf16 checkpoint at full size freed 4.4 GB of bfloat16 weights that the allocator kept: 8.6 GB resident
    before, 4.2 GB after."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    libc = ctypes.CDLL(library) if library else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def finish_loading(model, scheme: str, device: str = "cpu", compile_linears: bool = True):
    """
    The step after `from_pretrained(**load_kwargs(scheme, device))`. On the CPU, copy the unquantized tensors out of the
    checkpoint's memory map (`release_checkpoint_mapping`) and return the freed heap (`trim_heap`). For int8 and int4
    on the CPU, put the unquantized image path (`CPU_FP32_MODULES`) back in fp32 (the model casts between the two:
    pixels to the vision tower's dtype, the projected image tokens to the language model's); for int8 on the CPU, also
    compile the quantized linears (`compile_quantized_linears`) unless `compile_linears` is False. Returns the model.
    """
    import torch

    check_scheme(scheme)
    if _device_type(device) == "cpu" and not scheme.startswith("bnb-"):
        release_checkpoint_mapping(model)
        trim_heap()
    if scheme in CPU_BF16_SCHEMES and _device_type(device) == "cpu":
        for name in CPU_FP32_MODULES:
            model.get_submodule(name).to(torch.float32)
        if scheme == "int8" and compile_linears:
            compile_quantized_linears(model)
    return model


def load_quantized(path, scheme: str, device: str = "cpu", **kwargs):
    """`AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` quantized with `scheme` for
    `device`, through `load_kwargs` and `finish_loading`; other keyword arguments go to `from_pretrained`."""
    from transformers import AutoModelForImageTextToText

    options = {**load_kwargs(scheme, device, kwargs.pop("dtype", None)), **kwargs}
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, **options)
    if "device_map" not in options:
        model.to(device)
    return finish_loading(model, scheme, device).eval()
