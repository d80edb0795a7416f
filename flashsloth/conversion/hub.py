"""Upload a converted or built checkpoint folder to the Hugging Face Hub."""

import os
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)


def folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """The files `upload_folder` sends: relative POSIX path and size, sorted, hidden files and folders left out."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    dry_run: bool = False,
) -> list[tuple[str, int]]:
    """
    Upload `folder` to the model repository `repo_id` (created if needed; needs a token with write access, e.g. from
    `hf auth login` or `HF_TOKEN`) in one commit on `revision` (a branch, created from main if needed; default main).
    With `dry_run`, nothing is sent. Returns the files uploaded (or that would be), with their sizes.
    """
    files = folder_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no files to upload.")
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message or f"Upload FlashSloth checkpoint ({len(files)} files)",
        ignore_patterns=[".*", "**/.*"],
    )
    logger.info(f"Uploaded {len(files)} files to {repo_id}.")
    return files
