"""Tiny component checkpoints (SigLIP, Phi, Llama with a sentencepiece tokenizer) and original-format FlashSloth
folders made from the parity fixtures, for the conversion and build tests."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PhiConfig,
    PhiForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

from parity_helpers import PARITY_DIR, PHI2_TOKENIZER_DIR, regenerate_original_state_dict, require_shared
from processing_helpers import TINY_CORPUS, make_tiny_tokenizer


TINY_SIGLIP = dict(
    hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=84, patch_size=14
)
TINY_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
# EmbQ settings that fit the tiny components (the defaults are for the full-size model).
TINY_BUILD_OVERRIDES = dict(query_hidden_size=32)
REPO_ID = "Tongbo/FlashSloth-3.2B"


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init leaves biases at zero and LayerNorms at identity: perturb every parameter so that bugs show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.05)
    return model


def make_siglip(directory: Path, full: bool = True, seed: int = 0) -> Path:
    """A tiny SigLIP checkpoint: the full image + text `SiglipModel`, or the `SiglipVisionModel` alone."""
    torch.manual_seed(seed)
    if full:
        text_config = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
        config = SiglipConfig(vision_config=TINY_SIGLIP, text_config={**text_config, "vocab_size": 99})
        model = SiglipModel(config)
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP))
    perturb_(model, seed).save_pretrained(directory)
    return directory


def make_phi(directory: Path, seed: int = 0) -> Path:
    """A tiny Phi causal LM with a byte-level BPE tokenizer whose vocabulary it fits exactly (no FlashSloth tokens)."""
    tokenizer = make_tiny_tokenizer()
    base_vocab_size = len(tokenizer) - 3  # make_tiny_tokenizer adds the 3 FlashSloth tokens last
    torch.manual_seed(seed)
    config = PhiConfig(
        vocab_size=base_vocab_size, max_position_embeddings=512, partial_rotary_factor=0.4, bos_token_id=0,
        eos_token_id=0, **TINY_DECODER,
    )
    perturb_(PhiForCausalLM(config), seed).save_pretrained(directory)
    raw = AutoTokenizer.from_pretrained(_save_without_flashsloth_tokens(tokenizer, directory))
    assert len(raw) == base_vocab_size
    return directory


def _save_without_flashsloth_tokens(tokenizer, directory: Path) -> Path:
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] == "<|endoftext|>"]
    path.write_text(json.dumps(data))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("added_tokens_decoder", None)
    config.pop("extra_special_tokens", None)
    config_path.write_text(json.dumps(config))
    return directory


def train_sentencepiece(vocab_size: int = 120) -> bytes:
    """A tiny BPE sentencepiece model (ids: <unk> 0, <s> 1, </s> 2), trained on the tiny corpus."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def make_llama(directory: Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """A tiny Llama causal LM (no lm_head bias) with a tokenizer made from a sentencepiece model trained here."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(train_sentencepiece())
    vocab, _, merges = SentencePieceExtractor(str(directory / "tokenizer.model")).extract()
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings, **TINY_DECODER,
    )
    perturb_(LlamaForCausalLM(config), seed).save_pretrained(directory)
    return directory


RELEASED_ADDED_TOKENS = {"<learnable>": 50295, "</s>": 50296}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def write_released_tokenizer(directory: Path) -> Path:
    """
    The tokenizer files the released checkpoints ship (written by transformers 4.x): the Phi-2 files with `<learnable>`
    (50295, an additional special token) and `</s>` (50296, the eos token) added, padding with `<|endoftext|>`.
    """
    phi2 = require_shared(PHI2_TOKENIZER_DIR)
    files = {name: json.loads((phi2 / name).read_text()) for name in TOKENIZER_FILES if name.endswith(".json")}
    for content, token_id in RELEASED_ADDED_TOKENS.items():
        token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        files["tokenizer.json"]["added_tokens"].append({"id": token_id, **token})
        files["tokenizer_config.json"]["added_tokens_decoder"][str(token_id)] = token
        files["added_tokens.json"][content] = token_id
    files["tokenizer_config.json"].update(additional_special_tokens=["<learnable>"], eos_token="</s>", pad_token="<|endoftext|>")
    files["special_tokens_map.json"].update(additional_special_tokens=["<learnable>"], eos_token="</s>", pad_token="<|endoftext|>")
    for name, data in files.items():
        (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False))
    (directory / "merges.txt").write_bytes((phi2 / "merges.txt").read_bytes())
    return directory


def released_tokenizer():
    """The released checkpoints' tokenizer, loaded from files written by `write_released_tokenizer`."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = AutoTokenizer.from_pretrained(write_released_tokenizer(Path(directory)))
    assert tokenizer.convert_tokens_to_ids(["<learnable>", "</s>"]) == [50295, 50296] and tokenizer.eos_token == "</s>"
    return tokenizer


def hub_style_config(original_config: dict) -> dict:
    """The fixture's config as the Hub repos have it: `model_type` phi, without the three keys they lack."""
    config = {key: value for key, value in original_config.items() if key not in ("image_token_index", "image_token", "model_hd")}
    config["model_type"] = "phi"
    return config


def write_shards(state_dict: dict, directory: Path, num_shards: int, dtype: torch.dtype | None = None) -> list[Path]:
    """Save `state_dict` as `num_shards` safetensors shards with an index, like the Hub's original repos."""
    names = list(state_dict)
    chunks = [names[index::num_shards] for index in range(num_shards)]
    weight_map, paths = {}, []
    for index, chunk in enumerate(chunks, start=1):
        filename = f"model-{index:05d}-of-{num_shards:05d}.safetensors" if num_shards > 1 else "model.safetensors"
        tensors = {name: state_dict[name].to(dtype) if dtype else state_dict[name] for name in chunk}
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, filename))
        paths.append(directory / filename)
    if num_shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def make_original_checkpoint(
    directory: Path,
    variant: str = "base",
    num_shards: int = 2,
    hub_style: bool = True,
    state_dict: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """
    An original-format FlashSloth folder from a parity fixture: config.json, vision_config.json, the regenerated
    weights in `num_shards` shards, and the released-style Phi-2 tokenizer. `state_dict` replaces the weights.
    """
    fixture_dir = require_shared(PARITY_DIR / variant)
    directory.mkdir(parents=True, exist_ok=True)
    original_config = json.loads((fixture_dir / "original_config.json").read_text())
    config = hub_style_config(original_config) if hub_style else original_config
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "vision_config.json").write_bytes((fixture_dir / "vision_config.json").read_bytes())
    write_shards(state_dict if state_dict is not None else regenerate_original_state_dict(fixture_dir), directory, num_shards, dtype)
    write_released_tokenizer(directory)
    return directory


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative path -> digest), with the modification times."""
    return {
        f"{path.relative_to(directory)}@{path.stat().st_mtime_ns}": hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def place_in_hub_cache(folder: Path, cache_dir: Path, repo_id: str = REPO_ID, revision: str = "0" * 40) -> Path:
    """Lay `folder` out in a Hugging Face cache as `repo_id` at `revision` (refs/main points at it)."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def run_python(code: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `code` with `args` as `sys.argv[1:]` in a fresh Python process (offline), returning its completed process."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment, timeout=timeout
    )
