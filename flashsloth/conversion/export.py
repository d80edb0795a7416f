"""Write HF-native FlashSloth checkpoint folders: atomically, with generation settings and a rendered model card."""

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import site
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from packaging.requirements import Requirement
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
# Tokens that end an answer besides the tokenizer's own end-of-sequence token: `</s>` closes every assistant turn of
# the chat template, `<|endoftext|>` is Phi-2's end of text.
END_TOKENS = ("</s>", "<|endoftext|>")
MODEL_CARD_NAME = "model_card.md"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_PARTIAL_MARKER = ".partial-"


def transformers_requirement() -> str:
    """The package's transformers requirement as written in `setup.cfg` (e.g. `transformers>=5.23,<6`), read from a
    source checkout's setup.cfg, else from the installed package's metadata."""
    setup_cfg = Path(__file__).resolve().parents[2] / "setup.cfg"
    if setup_cfg.is_file():
        requirements = re.findall(r"^\s+(transformers\b\S*)\s*$", setup_cfg.read_text(encoding="utf-8"), re.MULTILINE)
    else:
        declared = importlib.metadata.requires("flashsloth") or []
        requirements = [requirement for requirement in declared if re.match(r"transformers\b", requirement)]
    if not requirements:
        raise ValueError("The flashsloth package declares no transformers requirement.")
    requirement = Requirement(requirements[0])
    # Lower bounds first, as people write ranges.
    specifiers = sorted(map(str, requirement.specifier), key=lambda text: (not text.startswith(">"), text))
    return requirement.name + ",".join(specifiers)


def default_generation_config(processor: ProcessorMixin, **overrides) -> GenerationConfig:
    """
    Greedy generation settings for a FlashSloth checkpoint: stop on the tokenizer's end-of-sequence token and on
    `</s>` / `<|endoftext|>` (whichever the vocabulary has), pad with the padding token, never generate the image or
    query placeholders, at most 512 new tokens. `overrides` replace any of these (e.g. `max_new_tokens=64`).
    """
    tokenizer = processor.tokenizer
    vocabulary = tokenizer.get_vocab()
    end_ids = [tokenizer.eos_token_id] + [vocabulary[token] for token in END_TOKENS if token in vocabulary]
    values = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=list(dict.fromkeys(token_id for token_id in end_ids if token_id is not None)),
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[processor.image_token_id, processor.query_token_id],
        do_sample=False,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    )
    values.update(overrides)
    return GenerationConfig(**values)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(target: Path):
    """Remove the temporary folders that interrupted runs (killed processes) left beside `target`."""
    for candidate in target.parent.glob(f".{target.name}{_PARTIAL_MARKER}*"):
        match = re.fullmatch(rf"\.{re.escape(target.name)}{re.escape(_PARTIAL_MARKER)}(\d+)-\w+", candidate.name)
        if match and candidate.is_dir() and not _process_is_alive(int(match.group(1))):
            logger.info(f"Removing {candidate}, left behind by an interrupted run.")
            shutil.rmtree(candidate, ignore_errors=True)


def check_output_dir(output_dir: str | os.PathLike, force: bool = False) -> Path:
    """
    Raise unless `output_dir` may be written: it must not be a file, nor a non-empty folder unless `force`. Returns
    it as an absolute path.
    """
    target = Path(output_dir).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another output folder.")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FileExistsError(
            f"{target} exists and is not empty: choose another output folder, or pass force=True (--force) to "
            "replace it."
        )
    return target


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """
    Yield a temporary folder beside `output_dir` to write into; when the block ends without error it becomes
    `output_dir` by a rename (an existing folder is moved aside first, then deleted), otherwise it is deleted.

    At every instant `output_dir` is either absent, the complete previous folder or the complete new one, also when
    the process is killed; a killed run leaves a hidden `.NAME.partial-PID-*` folder, removed by the next run.
    """
    target = check_output_dir(output_dir, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL_MARKER}{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        check_output_dir(target, force)  # nothing else may have filled it meanwhile
        previous = None
        if target.is_dir():
            previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
            os.replace(target, previous / target.name)
        os.replace(staging, target)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _model_card_template_path() -> Path:
    """`model_card.md` of a source checkout (editable installs) or of an installed wheel (`<prefix>/share/flashsloth/`,
    see `data_files` in setup.cfg)."""
    candidates = [
        Path(__file__).resolve().parents[2] / MODEL_CARD_NAME,
        Path(sys.prefix) / "share" / "flashsloth" / MODEL_CARD_NAME,
        Path(site.getuserbase()) / "share" / "flashsloth" / MODEL_CARD_NAME,  # pip install --user
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The model card template {MODEL_CARD_NAME} was not found (looked in {', '.join(map(str, candidates))}); "
        "reinstall the flashsloth package or pass a template explicitly."
    )


def checkpoint_summary(config, source: str | None = None) -> str:
    """One paragraph saying what a checkpoint with this config feeds the language model per image."""
    crops = config.num_crops
    tokens = config.image_tokens_per_crop * crops
    size = config.vision_config.image_size
    layout = "one view" if crops == 1 else "a global view and a 2x2 grid of a padded square"
    summary = (
        f"Each image is cut into {crops} crop{'s' if crops > 1 else ''} of {size}x{size} ({layout}): {tokens} image "
        f"tokens plus {config.num_query_tokens} query tokens reach the language model."
    )
    if source:
        summary += f" Converted from `{source}` (the original research-code format) with `flashsloth convert`."
    return summary


def render_model_card(context: dict[str, str], template: str | os.PathLike | None = None) -> str:
    """
    Fill the `{{ name }}` placeholders of the model card template (`model_card.md` of the package unless `template`
    names another file) from `context`; raise if the template asks for a value `context` lacks.
    """
    text = Path(template or _model_card_template_path()).read_text(encoding="utf-8")
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in context})
    if missing:
        raise ValueError(f"The model card template needs values for {missing}; pass them in model_card_context.")
    return _PLACEHOLDER.sub(lambda match: str(context[match.group(1)]), text)


def default_model_card_context(config, output_dir: Path, source: str | None = None) -> dict[str, str]:
    return {
        "model_name": output_dir.name,
        "repo_id": output_dir.name,
        "transformers_requirement": transformers_requirement(),
        "checkpoint_summary": checkpoint_summary(config, source),
    }


def _write_weights(model: PreTrainedModel, directory: Path, max_shard_size: int | str, dtype: torch.dtype | None):
    """`save_pretrained` for the model files; with `dtype`, the floating point weights are written cast to it."""
    if dtype is None or dtype == model.dtype:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return
    state_dict = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in model.state_dict().items()
    }
    model.save_pretrained(directory, state_dict=state_dict, max_shard_size=max_shard_size)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_native_checkpoint(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    dtype: torch.dtype | None = None,
    force: bool = False,
    model_card_context: dict[str, str] | None = None,
) -> Path:
    """
    Save a FlashSloth model and its processor as a complete HF-native checkpoint folder, atomically.

    The folder holds `config.json` (with `auto_map`), `generation_config.json` ([`default_generation_config`]),
    sharded safetensors weights with their index, the tokenizer and processor files (with the placeholder tokens),
    `chat_template.jinja`, the remote-code `.py` files, and a `README.md` rendered from the package's model card.
    It loads with the Auto classes and `trust_remote_code=True`, without this package installed.

    Args:
        model (`FlashSlothForConditionalGeneration`): the model; it is not modified.
        processor (`FlashSlothProcessor`): its processor.
        output_dir (`str` or `os.PathLike`): the folder to create; written as a temporary sibling, then renamed.
        max_shard_size (`int` or `str`, *optional*, defaults to `"2GB"`): largest weight shard.
        dtype (`torch.dtype`, *optional*): write the floating point weights in this dtype (a cast copy of them is
            made in memory); defaults to the model's.
        force (`bool`, *optional*, defaults to `False`): replace an existing non-empty `output_dir` (atomically).
        model_card_context (`dict`, *optional*): values for the model card's placeholders (`model_name`, `repo_id`,
            `transformers_requirement`, `checkpoint_summary`); defaults derive from the folder name and the config.

    Returns:
        `Path`: the absolute path of the written folder.
    """
    target = check_output_dir(output_dir, force)
    context = default_model_card_context(model.config, target)
    context.update(model_card_context or {})
    readme = render_model_card(context)
    with atomic_output_dir(target, force=force) as staging:
        _write_weights(model, staging, max_shard_size, dtype)
        processor.save_pretrained(staging)
        default_generation_config(processor).save_pretrained(staging)
        (staging / "README.md").write_text(readme, encoding="utf-8")
    logger.info(f"Saved a FlashSloth checkpoint to {target}.")
    return target
