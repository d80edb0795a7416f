"""Convert a released FlashSloth checkpoint (the research code's format, as on the Hub) into an HF-native folder."""

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int

from flashsloth.configuration_flashsloth import FlashSlothConfig
from flashsloth.modeling_flashsloth import FlashSlothForConditionalGeneration
from flashsloth.processing import build_processor

from .export import atomic_output_dir, check_output_dir, default_generation_config, default_model_card_context
from .export import render_model_card
from .original_layout import KNOWN_VISION_TOWERS, convert_original_key, flashsloth_config_from_original
from .shards import SourceTensors, TargetTensor, plan_shards, write_index, write_safetensors


logger = logging.get_logger(__name__)

ORIGINAL_ARCHITECTURE = "FlashSlothForCausalLM"
VISION_CONFIG_NAME = "vision_config.json"
REPO_ID_PATTERN = re.compile(r"[\w.-]+/[\w.-]+")
# What a conversion needs from a Hub repository: configs, weights, tokenizer files.
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_LISTED = 8


class ConversionError(ValueError):
    """The source checkpoint does not fit the FlashSloth layout; the message lists every offending tensor."""


def resolve_source(source: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder as is; a Hub repository id (`owner/name`) downloaded with `huggingface_hub` (or taken from the
    local cache when offline)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{source} is a file; the source must be a checkpoint folder or a Hub repository id.")
    if not REPO_ID_PATTERN.fullmatch(str(source)):
        raise FileNotFoundError(f"{source} is neither an existing folder nor a Hub repository id (owner/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    patterns = list(DOWNLOAD_PATTERNS) + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(f"{source} (revision {revision or 'main'}) is not on the Hub: {error}") from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise ConnectionError(
            f"{source} is not a local folder, and as a Hub repository it cannot be downloaded nor found in the local "
            f"cache ({type(error).__name__}). "
            f"Offline (HF_HUB_OFFLINE=1 or no network): download it where there is network (`hf download {source}`) "
            "and pass the folder."
        ) from error


def read_original_config(source_dir: Path) -> dict:
    """The source `config.json`, checked to describe an original FlashSloth model."""
    path = source_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{source_dir} has no config.json: it is not a checkpoint folder.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    architectures = config.get("architectures") or []
    if ORIGINAL_ARCHITECTURE in architectures:
        return config
    if config.get("model_type") == "flashsloth" and "text_config" in config:
        raise ValueError(f"{source_dir} already is an HF-native FlashSloth checkpoint: load it directly.")
    raise ValueError(
        f"{source_dir} holds a {', '.join(architectures) or config.get('model_type', 'unknown')} model, "
        "not an original "
        f"FlashSloth checkpoint (architectures [{ORIGINAL_ARCHITECTURE!r}]). To make a new FlashSloth from a language "
        "model and SigLIP, use `flashsloth build`."
    )


def read_vision_config(source_dir: Path, original_config: dict, vision_config: str | os.PathLike | dict | None):
    """The SigLIP config: given, else `vision_config.json` beside the source config, else the published config of the
    Hub id in `mm_vision_tower`."""
    if isinstance(vision_config, dict):
        return vision_config
    path = Path(vision_config) if vision_config is not None else source_dir / VISION_CONFIG_NAME
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        return config.get("vision_config", config) if config.get("model_type") == "siglip" else config
    if vision_config is not None:
        raise FileNotFoundError(f"The vision config file {vision_config} does not exist.")
    tower = original_config.get("mm_vision_tower")
    if tower in KNOWN_VISION_TOWERS:
        return None  # flashsloth_config_from_original knows it
    raise ValueError(
        f"The source names its vision tower {tower!r}, whose config is not known here: put its SigLIP config as "
        f"{VISION_CONFIG_NAME} beside the source config.json, or pass --vision-config FILE."
    )


def load_source_tokenizer(source_dir: Path, tokenizer: str | os.PathLike | None):
    try:
        return AutoTokenizer.from_pretrained(tokenizer if tokenizer is not None else source_dir)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Cannot load a tokenizer from {tokenizer or source_dir} ({str(error).splitlines()[0]}); pass --tokenizer "
            "with the folder or Hub id of the checkpoint's tokenizer."
        ) from error


def set_processor_ids(config: FlashSlothConfig, processor, dtype: torch.dtype):
    """Give the converted config its processor's placeholder and padding ids, and its dtype."""
    tokenizer = processor.tokenizer
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens, more than the checkpoint's vocabulary "
            f"({config.text_config.vocab_size}): it is not this checkpoint's tokenizer."
        )
    config.image_token_id = processor.image_token_id
    config.query_token_id = processor.query_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config._validate_flashsloth()
    config.dtype = dtype


def expected_tensors(config: FlashSlothConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a FlashSloth with this config saves (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = FlashSlothForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def plan_conversion(source: SourceTensors, config: FlashSlothConfig, dtype: torch.dtype) -> list[TargetTensor]:
    """
    Map every source tensor to its native name and check the result against the model the config describes: every
    source tensor mapped, every target tensor filled, with the right shape and a floating point dtype. Raises a
    [`ConversionError`] listing all offenders. Tensors keep the source files' order (one pass over each file).
    """
    expected = expected_tensors(config)
    plan, claimed = [], {}
    unmapped, unexpected, wrong_shape, wrong_dtype = [], [], [], []
    for info in source.infos.values():
        target = convert_original_key(info.name)
        if target is None:
            unmapped.append(info.name)
            continue
        if target not in expected:
            unexpected.append(f"{info.name} (-> {target})")
            continue
        if target in claimed:
            unexpected.append(f"{info.name} (-> {target}, also filled by {claimed[target]})")
            continue
        claimed[target] = info.name
        if info.shape != expected[target]:
            wrong_shape.append(f"{info.name} {list(info.shape)} (expected {list(expected[target])})")
        elif not info.is_floating_point:
            wrong_dtype.append(f"{info.name} ({info.dtype}, expected a floating point dtype)")
        else:
            plan.append(TargetTensor(target, info.name, info.shape, dtype))
    missing = [name for name in expected if name not in claimed]
    problems = []
    for label, items in (
        ("missing tensors (in the model, not in the source)", missing),
        ("tensors not in the FlashSloth layout", unmapped),
        ("unexpected tensors", unexpected),
        ("tensors of the wrong shape", wrong_shape),
        ("tensors of the wrong dtype", wrong_dtype),
    ):
        if items:
            problems.append(f"{len(items)} {label}: {_listed(items)}")
    if problems:
        raise ConversionError(
            f"{source.directory} does not fit the FlashSloth layout of its config: " + "; ".join(problems) + "."
        )
    return plan


def target_dtype(dtype: str | torch.dtype | None, original_config: dict, source: SourceTensors) -> torch.dtype:
    """The requested dtype; by default the source config's `torch_dtype`, else the source tensors' commonest one."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or 'auto', got {dtype!r}.")
        return DTYPES[dtype]
    configured = original_config.get("torch_dtype", original_config.get("dtype"))
    if configured in DTYPES:
        return DTYPES[configured]
    floating = Counter(info.dtype for info in source.infos.values() if info.is_floating_point)
    return floating.most_common(1)[0][0] if floating else torch.float32


def _check_not_overlapping(source_dir: Path, target: Path):
    source_dir, target = source_dir.resolve(), target.resolve()
    if source_dir == target or source_dir in target.parents or target in source_dir.parents:
        raise ValueError(f"The output folder {target} must lie outside the source {source_dir} (and not contain it).")


def convert_original_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    vision_config: str | os.PathLike | dict | None = None,
    tokenizer: str | os.PathLike | None = None,
    max_shard_size: int | str = "2GB",
    allow_pickle: bool = False,
    force: bool = False,
    revision: str | None = None,
    model_card_context: dict[str, str] | None = None,
) -> Path:
    """
    Convert an original FlashSloth checkpoint (`Tongbo/FlashSloth-3.2B`, `Tongbo/FlashSloth_HD-3.2B`,
    `Tongbo/FlashSloth-3.2B-Stage1` or a folder laid out like them) into an HF-native checkpoint folder, the same
    files [`save_native_checkpoint`] writes.

    The weights stream tensor by tensor from the source shards (about one tensor in memory); every source tensor must
    map to a FlashSloth tensor and every FlashSloth tensor must be filled with the right shape, otherwise a
    [`ConversionError`] lists the offenders before anything is written. The output is written into a temporary
    sibling folder and renamed at the end; the source is only read.

    Args:
        source: a checkpoint folder, or a Hub repository id (downloaded, or read from the cache when offline).
        output_dir: the folder to create.
        dtype (*optional*): `"float32"`, `"float16"`, `"bfloat16"` or a torch dtype; default (`None`/`"auto"`): the
            source config's `torch_dtype`.
        vision_config (*optional*): a SigLIP config file (or dict); default: `vision_config.json` beside the source
            config, else the published config of the Hub id in `mm_vision_tower`.
        tokenizer (*optional*): folder or Hub id of the tokenizer; default: the source folder's.
        max_shard_size (*optional*, defaults to `"2GB"`): largest output shard.
        allow_pickle (*optional*, defaults to `False`): accept `.bin` weights (read with
            `torch.load(weights_only=True)`).
        force (*optional*, defaults to `False`): replace a non-empty `output_dir` (atomically).
        revision (*optional*): the Hub revision of `source`.
        model_card_context (*optional*): values for the model card's placeholders.

    Returns:
        `Path`: the converted folder.
    """
    target = check_output_dir(output_dir, force)
    convert_file_size_to_int(max_shard_size)  # a bad size fails before any download
    source_dir = resolve_source(source, revision, allow_pickle)
    _check_not_overlapping(source_dir, target)
    original_config = read_original_config(source_dir)
    vision = read_vision_config(source_dir, original_config, vision_config)
    tensors = SourceTensors(source_dir, allow_pickle)
    dtype = target_dtype(dtype, original_config, tensors)

    processor_tokenizer = load_source_tokenizer(source_dir, tokenizer)
    if original_config.get("tokenizer_model_max_length"):
        processor_tokenizer.model_max_length = original_config["tokenizer_model_max_length"]
    config = flashsloth_config_from_original(original_config, vision)
    processor = build_processor(
        processor_tokenizer,
        image_hd=config.num_crops == 5,
        image_aspect_ratio=original_config.get("image_aspect_ratio", "square"),
        image_size=config.vision_config.image_size,
        num_image_tokens_per_crop=config.image_tokens_per_crop,
        num_query_tokens=config.num_query_tokens,
    )
    set_processor_ids(config, processor, dtype)
    plan = plan_conversion(tensors, config, dtype)
    context = default_model_card_context(config, target, source=str(source))
    context.update(model_card_context or {})
    readme = render_model_card(context)

    shards = plan_shards(plan, max_shard_size)
    with atomic_output_dir(target, force=force) as staging:
        _write_converted_weights(tensors, shards, staging)
        with torch.device("meta"):
            model = FlashSlothForConditionalGeneration(config)
        config.architectures = [type(model).__name__]
        custom_object_save(model, staging, config=config)
        config.save_pretrained(staging)
        processor.save_pretrained(staging)
        default_generation_config(processor).save_pretrained(staging)
        (staging / "README.md").write_text(readme, encoding="utf-8")
    tensors.close()
    logger.info(f"Converted {source} to {target}.")
    return target


def _write_converted_weights(source: SourceTensors, shards: dict[str, list[TargetTensor]], directory: Path):
    total = sum(tensor.nbytes for group in shards.values() for tensor in group)
    with logging.tqdm(total=total, unit="B", unit_scale=True, desc="Converting weights") as progress:
        for filename, group in shards.items():
            write_safetensors(
                directory / filename,
                group,
                load=lambda tensor: source.read(tensor.source).to(tensor.dtype),
                on_tensor=lambda tensor: progress.update(tensor.nbytes),
            )
    write_index(directory, shards)
