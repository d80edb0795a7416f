"""Pure tensor layout math of FlashSloth: the SAP window grid and where each EmbQ query block sits and what it reads."""

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_flashsloth import FlashSlothConfig


def window_partition(features: torch.Tensor, grid_size: int, window_size: int) -> torch.Tensor:
    """
    Cut a row-major patch grid into non-overlapping square windows.

    `features` `(num_crops, grid_size**2, dim)` -> `(num_crops, num_windows, window_size**2, dim)`, windows in
    row-major order over the grid, patches in row-major order inside a window.
    """
    num_crops, _, dim = features.shape
    windows_per_side = grid_size // window_size
    features = features.view(num_crops, windows_per_side, window_size, windows_per_side, window_size, dim)
    features = features.permute(0, 1, 3, 2, 4, 5)
    return features.reshape(num_crops, windows_per_side**2, window_size**2, dim)


def attention_pool(windows: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Softmax-weighted sum of each window's patches.

    `windows` `(num_crops, num_windows, patches, dim)`, `scores` `(num_crops, num_windows, patches)` ->
    pooled `(num_crops, num_windows, dim)` and the weights `(num_crops, num_windows, patches)`.
    """
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(windows.dtype)
    pooled = torch.einsum("cwp,cwpd->cwd", weights, windows)
    return pooled, weights


@dataclass
class QueryBlockLayout:
    """
    Where each query block of a batch sits and what it reads in EmbQ. Indices are into the flattened
    `(batch_size * sequence_length)` token axis, or into the rows of the concatenated raw image features.
    """

    query_positions: torch.LongTensor  # (num_blocks, num_query_tokens)
    text_positions: torch.LongTensor  # (num_blocks, max_text_length)
    text_mask: torch.BoolTensor  # (num_blocks, max_text_length)
    image_rows: torch.LongTensor  # (num_blocks, max_image_rows)
    image_mask: torch.BoolTensor  # (num_blocks, max_image_rows)


# Instruction spans are padded to a multiple of this many tokens (or to the whole sequence, if shorter): prompts of one
# length bucket then give the layout the same shapes, and a compiled prefill serves them all without recompiling.
TEXT_WIDTH_MULTIPLE = 32


def _first_true_indices(
    membership: torch.BoolTensor, width_multiple: int = 1
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """For each row of a `(rows, columns)` mask: the column indices of its True entries, in order, left-aligned and
    padded to the longest row (at least 1) rounded up to `width_multiple` (at most `columns`), with the mask telling
    which are real."""
    longest = max(int(membership.sum(dim=1).max()) if membership.numel() else 0, 1)
    longest = min(-(-longest // width_multiple) * width_multiple, membership.shape[1])
    ordered = torch.sort(membership.to(torch.uint8), dim=1, descending=True, stable=True)
    return ordered.indices[:, :longest], ordered.values[:, :longest].bool()


def build_query_block_layout(
    input_ids: torch.LongTensor,
    instruction_mask: torch.LongTensor | None,
    image_num_crops: torch.LongTensor,
    config: FlashSlothConfig,
) -> QueryBlockLayout | None:
    """
    Locate every query block and what it attends to in EmbQ, without Python loops over samples.

    - A query block is a run of `config.num_query_tokens` query placeholders; blocks are numbered left to right in
      each sample (1, 2, ...).
    - Its instruction text is the tokens whose `instruction_mask` value equals its number. Without a mask, it is the
      text after the latest image block (skipping the one token that follows it, the newline) or query block before
      it.
    - Its images are the images of its sample whose placeholders come before it; it reads their un-pooled features.

    Returns `None` when the batch has no query block.
    """
    batch_size, sequence_length = input_ids.shape
    device = input_ids.device
    num_query_tokens = config.num_query_tokens
    query_token_mask = input_ids == config.query_token_id
    queries_per_sample = query_token_mask.sum(dim=1)
    if not bool(query_token_mask.any()):
        return None
    query_positions = query_token_mask.flatten().nonzero().squeeze(1)
    if bool((queries_per_sample % num_query_tokens).any()) or bool(
        (query_positions.view(-1, num_query_tokens).diff(dim=1) != 1).any()
    ):
        raise ValueError(
            f"Every query block must hold exactly {num_query_tokens} consecutive query tokens (id "
            f"{config.query_token_id}); got {queries_per_sample.tolist()} query tokens per sample. Build the inputs "
            "with the FlashSloth processor, which expands each query placeholder."
        )
    query_positions = query_positions.view(-1, num_query_tokens)
    block_starts = query_positions[:, 0]
    block_sample = block_starts // sequence_length
    block_position = block_starts % sequence_length
    blocks_per_sample = queries_per_sample // num_query_tokens
    first_block_of_sample = torch.cumsum(blocks_per_sample, 0) - blocks_per_sample
    block_number = torch.arange(len(block_starts), device=device) - first_block_of_sample[block_sample] + 1

    # Image placeholders, one run of `tokens_per_crop * crops` per image, in batch-then-sequence order.
    positions = torch.arange(sequence_length, device=device)
    image_token_mask = input_ids == config.image_token_id
    tokens_per_image = image_num_crops * config.image_tokens_per_crop
    image_token_flat = image_token_mask.flatten().nonzero().squeeze(1)
    image_first_token = image_token_flat[torch.cumsum(tokens_per_image, 0) - tokens_per_image]
    image_sample = image_first_token // sequence_length
    image_position = image_first_token % sequence_length

    # Instruction text of each block: (num_blocks, sequence_length) membership in its own sample.
    if instruction_mask is not None:
        if instruction_mask.shape[1] < sequence_length:  # uncached generation appends tokens after the prompt
            instruction_mask = nn.functional.pad(instruction_mask, (0, sequence_length - instruction_mask.shape[1]))
        text_membership = instruction_mask.to(device)[block_sample] == block_number[:, None]
    else:
        before_block = positions[None, :] < block_position[:, None]
        sample_images = image_token_mask[block_sample] & before_block
        last_image_token = torch.where(sample_images, positions, -2).amax(dim=1)
        sample_queries = query_token_mask[block_sample] & before_block
        last_query_token = torch.where(sample_queries, positions, -1).amax(dim=1)
        text_start = torch.maximum(last_image_token + 2, last_query_token + 1)
        text_membership = before_block & (positions[None, :] >= text_start[:, None])
    text_positions, text_mask = _first_true_indices(text_membership, TEXT_WIDTH_MULTIPLE)
    text_positions = text_positions + (block_sample * sequence_length)[:, None]

    # Raw feature rows of the images each block may read.
    rows_per_image = image_num_crops * config.patch_grid_size**2
    row_image = torch.repeat_interleave(torch.arange(len(rows_per_image), device=device), rows_per_image)
    image_visible = (image_sample[None, :] == block_sample[:, None]) & (image_position[None, :] < block_position[:, None])
    image_rows, image_mask = _first_true_indices(image_visible[:, row_image])

    return QueryBlockLayout(
        query_positions=query_positions,
        text_positions=text_positions,
        text_mask=text_mask,
        image_rows=image_rows,
        image_mask=image_mask,
    )


__all__ = ["QueryBlockLayout", "attention_pool", "build_query_block_layout", "window_partition"]
