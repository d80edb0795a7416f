"""Layout math of FlashSloth: the SAP window grid (tensor functions) and where each EmbQ query block sits and what it
reads (host data, built once per prompt)."""

from dataclasses import dataclass

import torch

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
    `(batch_size * sequence_length)` token axis, or into the rows of the concatenated raw image features; padded
    entries (mask False) hold a valid index: 0 for text, the block's last image row for images.
    """

    query_positions: torch.LongTensor  # (num_blocks, num_query_tokens)
    text_positions: torch.LongTensor  # (num_blocks, max_text_length)
    text_mask: torch.BoolTensor  # (num_blocks, max_text_length)
    image_rows: torch.LongTensor  # (num_blocks, max_image_rows)
    image_mask: torch.BoolTensor  # (num_blocks, max_image_rows)
    has_text: torch.BoolTensor  # (num_blocks,): the block has instruction text to read
    has_image: torch.BoolTensor  # (num_blocks,): an image comes before the block
    image_num_crops: tuple[int, ...]  # crops of every image of the batch, in text order


# Instruction spans are padded to a multiple of this many tokens (or to the whole sequence, if shorter): prompts of one
# length bucket then give the layout the same shapes, and a compiled prefill serves them all without recompiling.
TEXT_WIDTH_MULTIPLE = 32


def check_image_placeholders(num_image_tokens: int, image_num_crops: list[int], config: FlashSlothConfig) -> None:
    """Raise a clear error when the prompt's image placeholders do not match the crops of the images."""
    total_crops = sum(image_num_crops)
    if num_image_tokens != total_crops * config.image_tokens_per_crop:
        raise ValueError(
            f"The prompt holds {num_image_tokens} image tokens (id {config.image_token_id}) but the images give "
            f"{total_crops * config.image_tokens_per_crop} ({total_crops} crops x {config.image_tokens_per_crop}). "
            "Each image needs one placeholder in the text; the FlashSloth processor expands it to the right number "
            "of tokens."
        )


def _padded(rows: list[list[int]], width: int) -> tuple[list[int], list[bool]]:
    """Rows of indices left-aligned in `width` columns, padded with index 0, flattened, with their validity mask."""
    indices, mask = [], []
    for row in rows:
        indices += row + [0] * (width - len(row))
        mask += [True] * len(row) + [False] * (width - len(row))
    return indices, mask


def build_query_block_layout(
    input_ids: torch.LongTensor | list[list[int]],
    instruction_mask: torch.LongTensor | list[list[int]] | None,
    image_num_crops: torch.LongTensor | list[int],
    config: FlashSlothConfig,
    device: torch.device | str | None = None,
) -> QueryBlockLayout | None:
    """
    Locate every query block and what it attends to in EmbQ.

    - A query block is a run of `config.num_query_tokens` query placeholders; blocks are numbered left to right in
      each sample (1, 2, ...).
    - Its instruction text is the tokens whose `instruction_mask` value equals its number. Without a mask, it is the
      text after the latest image block (skipping the one token that follows it, the newline) or query block before
      it.
    - Its images are the images of its sample whose placeholders come before it; it reads their un-pooled features.

    The layout is host data: the ids are read back once, the layout is computed in Python, and it goes to the device
    (`device`, by default the ids') as two tensors, expanded there by three small operations: on a GPU one
    synchronisation, two copies and three kernels instead of dozens of kernels and several synchronisations. Also
    checks the image placeholders against `image_num_crops`. Returns `None` when the batch has no query block.
    """
    if isinstance(input_ids, torch.Tensor):
        device = input_ids.device if device is None else device
        input_ids = input_ids.tolist()
    if isinstance(instruction_mask, torch.Tensor):
        instruction_mask = instruction_mask.tolist()
    if isinstance(image_num_crops, torch.Tensor):
        image_num_crops = image_num_crops.flatten().tolist()
    # Config attributes read once: transformers' config attribute access is slow in loops over tokens.
    num_query_tokens, grid_rows = config.num_query_tokens, config.patch_grid_size**2
    image_token_id, query_token_id, tokens_per_crop = (
        config.image_token_id,
        config.query_token_id,
        config.image_tokens_per_crop,
    )
    sequence_length = len(input_ids[0]) if input_ids else 0

    # Image placeholders, one run of `image_tokens_per_crop * crops` per image, in batch-then-sequence order (lists of
    # ints, not of tuples: thousands of small tuples would cost garbage-collection passes over the whole heap).
    image_positions = [[p for p, token in enumerate(ids) if token == image_token_id] for ids in input_ids]
    check_image_placeholders(sum(map(len, image_positions)), image_num_crops, config)
    images = [[] for _ in input_ids]  # per sample: (position of its first placeholder, first feature row, rows)
    sample = placeholder = first_row = 0
    for crops in image_num_crops:
        while placeholder == len(image_positions[sample]):
            sample, placeholder = sample + 1, 0
        if placeholder + crops * tokens_per_crop > len(image_positions[sample]):
            raise ValueError(
                f"Sample {sample} holds {len(image_positions[sample])} image tokens, which do not split into its "
                f"images' runs of {tokens_per_crop} tokens per crop (image_num_crops {list(image_num_crops)}). Build "
                "the inputs with the FlashSloth processor, which expands each image placeholder."
            )
        images[sample].append((image_positions[sample][placeholder], first_row, crops * grid_rows))
        placeholder += crops * tokens_per_crop
        first_row += crops * grid_rows

    query_tokens = [[p for p, token in enumerate(ids) if token == query_token_id] for ids in input_ids]
    blocks = []  # (sample, its query positions, its number in the sample)
    for sample, positions in enumerate(query_tokens):
        for number, start in enumerate(range(0, len(positions), num_query_tokens), start=1):
            block = positions[start : start + num_query_tokens]
            if len(block) != num_query_tokens or block[-1] - block[0] != num_query_tokens - 1:
                raise ValueError(
                    f"Every query block must hold exactly {num_query_tokens} consecutive query tokens (id "
                    f"{config.query_token_id}); got {[len(p) for p in query_tokens]} query tokens per sample. Build "
                    "the inputs with the FlashSloth processor, which expands each query placeholder."
                )
            blocks.append((sample, block, number))
    if not blocks:
        return None

    # A sample's images hold consecutive feature rows, and a block sees the images before it: a prefix of them, so
    # one range of rows (first row, count) per block.
    text_rows, image_first_rows, image_row_counts = [], [], []
    for sample, block, number in blocks:
        start, offset = block[0], sample * sequence_length
        if instruction_mask is not None:
            spans = instruction_mask[sample][:sequence_length]
            text = [position for position, span in enumerate(spans) if span == number]
        else:
            last_image = max((p for p in image_positions[sample] if p < start), default=-2)
            last_query = max((p for p in query_tokens[sample] if p < start), default=-1)
            text = list(range(max(last_image + 2, last_query + 1), start))
        text_rows.append([offset + position for position in text])
        visible = [(first, rows) for position, first, rows in images[sample] if position < start]
        image_first_rows.append(visible[0][0] if visible else 0)
        image_row_counts.append(sum(rows for _, rows in visible))
    longest_text = max(max(map(len, text_rows)), 1)
    text_width = min(-(-longest_text // TEXT_WIDTH_MULTIPLE) * TEXT_WIDTH_MULTIPLE, sequence_length)
    image_width = min(max(max(image_row_counts), 1), max(first_row, 1))
    text_positions, text_mask = _padded(text_rows, text_width)
    query_positions = [sample * sequence_length + position for sample, block, _ in blocks for position in block]
    last_visible_rows = [max(count - 1, 0) for count in image_row_counts]

    num_blocks = len(blocks)
    indices = torch.tensor(
        query_positions
        + text_positions
        + image_first_rows
        + last_visible_rows
        + image_row_counts
        + [*range(image_width)],
        dtype=torch.long,
        device=device,
    )
    flags = [bool(row) for row in text_rows] + [bool(count) for count in image_row_counts]
    masks = torch.tensor(text_mask + flags, dtype=torch.bool, device=device)
    query_positions, text_positions, image_first_rows, last_visible_rows, image_row_counts, row_offsets = indices.split(
        [num_blocks * num_query_tokens, num_blocks * text_width, num_blocks, num_blocks, num_blocks, image_width]
    )
    text_mask, has_text, has_image = masks.split([num_blocks * text_width, num_blocks, num_blocks])
    # (num_blocks, image_width): the block's rows, padded by repeating its last row (masked out).
    image_rows = image_first_rows[:, None] + torch.minimum(row_offsets[None, :], last_visible_rows[:, None])
    image_mask = row_offsets[None, :] < image_row_counts[:, None]
    return QueryBlockLayout(
        query_positions=query_positions.view(num_blocks, num_query_tokens),
        text_positions=text_positions.view(num_blocks, text_width),
        text_mask=text_mask.view(num_blocks, text_width),
        image_rows=image_rows,
        image_mask=image_mask,
        has_text=has_text,
        has_image=has_image,
        image_num_crops=tuple(image_num_crops),
    )


__all__ = [
    "QueryBlockLayout",
    "attention_pool",
    "build_query_block_layout",
    "check_image_placeholders",
    "window_partition",
]
