"""Read checkpoint weights one tensor at a time and write sharded safetensors files one tensor at a time, so that a
conversion holds about one tensor in memory whatever the checkpoint's size."""

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int


logger = logging.get_logger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_SAFETENSORS_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives and what it is."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a string for dtypes torch cannot hold here (e.g. unsupported safetensors types)

    @property
    def is_floating_point(self) -> bool:
        return isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point


def _weight_files(directory: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a checkpoint folder, from its index when it has one; safetensors first, `.bin` only when
    allowed."""
    for index_name, pattern, pickled in ((SAFETENSORS_INDEX, "*.safetensors", False), (PICKLE_INDEX, "*.bin", True)):
        index_path = directory / index_name
        if index_path.is_file():
            files = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = sorted(path.name for path in directory.glob(pattern))
        if not files:
            continue
        if pickled and not allow_pickle:
            raise ValueError(
                f"{directory} holds only pickled .bin weights; loading them runs no code when read with "
                "torch.load(weights_only=True), but pass allow_pickle=True (--allow-pickle) to allow it."
            )
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"The weight files {missing} listed by {index_name} are missing from {directory}.")
        return [directory / name for name in files]
    raise FileNotFoundError(f"{directory} holds no weight files (*.safetensors, or *.bin with --allow-pickle).")


def _safetensors_infos(path: Path) -> list[TensorInfo]:
    try:
        with safe_open(path, framework="pt") as handle:
            infos = []
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                dtype = tensor_slice.get_dtype()
                shape = tuple(tensor_slice.get_shape())
                infos.append(TensorInfo(name, path, shape, _SAFETENSORS_TO_TORCH.get(dtype, dtype)))
            return infos
    except SafetensorError as error:
        raise ValueError(f"The weight file {path} is truncated or corrupt ({error}); download it again.") from error


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for bad archives (RuntimeError, UnpicklingError, EOFError...)
        raise ValueError(
            f"The weight file {path} is truncated, corrupt or not a plain state dict ({error})."
        ) from error


class SourceTensors:
    """
    The tensors of a checkpoint folder, indexed from the file headers without reading data; `read` loads one tensor.
    Safetensors files are opened per tensor (memory-mapped only while it is read); one `.bin` file at a time stays
    memory-mapped.
    """

    def __init__(self, directory: str | os.PathLike, allow_pickle: bool = False):
        self.directory = Path(directory)
        self.files = _weight_files(self.directory, allow_pickle)
        self.infos: dict[str, TensorInfo] = {}
        duplicates = []
        for path in self.files:
            for info in self._file_infos(path):
                if info.name in self.infos:
                    duplicates.append(info.name)
                self.infos[info.name] = info
        if duplicates:
            raise ValueError(f"The tensors {duplicates[:10]} appear in more than one weight file of {self.directory}.")
        self._open_pickle: tuple[Path, dict] | None = None

    def _file_infos(self, path: Path) -> list[TensorInfo]:
        if path.suffix == ".safetensors":
            return _safetensors_infos(path)
        state_dict = _load_pickle(path)
        return [TensorInfo(name, path, tuple(tensor.shape), tensor.dtype) for name, tensor in state_dict.items()]

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        if info.file.suffix == ".safetensors":
            try:
                with safe_open(info.file, framework="pt") as handle:
                    return handle.get_tensor(name)
            except SafetensorError as error:
                raise ValueError(f"Cannot read {name} from {info.file} ({error}); download it again.") from error
        if self._open_pickle is None or self._open_pickle[0] != info.file:
            self._open_pickle = None
            self._open_pickle = (info.file, _load_pickle(info.file))
        return self._open_pickle[1][name]

    def close(self):
        self._open_pickle = None


@dataclass(frozen=True)
class TargetTensor:
    """One tensor of the converted checkpoint: its name, where it comes from and what it must be."""

    name: str
    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[TargetTensor], max_shard_size: int | str) -> dict[str, list[TargetTensor]]:
    """Group tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor gets its own shard),
    named like `save_pretrained` names them."""
    limit = convert_file_size_to_int(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}.")
    groups: list[list[TargetTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    total = len(groups)
    return {f"model-{index:05d}-of-{total:05d}.safetensors": group for index, group in enumerate(groups, start=1)}


def safetensors_header(tensors: Iterable[TargetTensor]) -> bytes:
    """The header of a safetensors file holding `tensors` back to back in this order (length prefix included)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(encoded).to_bytes(8, "little") + encoded


def write_safetensors(
    path: Path, tensors: list[TargetTensor], load: Callable[[TargetTensor], torch.Tensor], on_tensor: Callable = None
):
    """Write one safetensors file, calling `load` for one tensor at a time (it must return the planned shape/dtype)."""
    with open(path, "wb") as file:
        file.write(safetensors_header(tensors))
        for tensor in tensors:
            data = load(tensor).contiguous()
            if tuple(data.shape) != tensor.shape or data.dtype != tensor.dtype:
                raise ValueError(
                    f"{tensor.source} was read as {tuple(data.shape)} {data.dtype}, "
                    f"expected {tensor.shape} {tensor.dtype}."
                )
            file.write(data.reshape(-1).view(torch.uint8).numpy().data)
            if on_tensor is not None:
                on_tensor(tensor)


def write_index(directory: Path, shards: dict[str, list[TargetTensor]]):
    """`model.safetensors.index.json` for a sharded checkpoint (nothing for a single file)."""
    if len(shards) == 1:
        return
    weight_map = {tensor.name: filename for filename, group in shards.items() for tensor in group}
    total_size = sum(tensor.nbytes for group in shards.values() for tensor in group)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
