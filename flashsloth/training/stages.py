"""The paper's training stages: which parameter groups of a FlashSloth model train, and a table of them.

- Stage 1 (alignment): Spatial Attention Pooling and the projector; everything else frozen.
- Stage 2 (instruction tuning): SAP, projector, query tokens, EmbQ, the language model and its head; the HD variant
  also trains the vision encoder (`train_vision_tower=True`).
"""

from dataclasses import dataclass

from torch import nn


# Parameter groups in the order of the forward pass: (group, attribute on `FlashSlothModel` or the top model).
GROUPS = (
    "vision_tower",
    "spatial_pooling",
    "multi_modal_projector",
    "query_tokens",
    "embedded_query",
    "language_model",
    "lm_head",
)
STAGE_GROUPS = {
    1: ("spatial_pooling", "multi_modal_projector"),
    2: ("spatial_pooling", "multi_modal_projector", "query_tokens", "embedded_query", "language_model", "lm_head"),
}
LORA_MARKER = "lora_"


@dataclass
class TrainableRow:
    """One line of the table of trainable parameters."""

    group: str
    trainable: int
    total: int


def stage_groups(stage: int, train_vision_tower: bool = False) -> tuple[str, ...]:
    """The parameter groups trained in `stage` (1 or 2), plus the vision tower when asked."""
    if stage not in STAGE_GROUPS:
        raise ValueError(f"Unknown training stage {stage!r}: use 1 (SAP + projector) or 2 (instruction tuning).")
    groups = STAGE_GROUPS[stage]
    return ("vision_tower",) + groups if train_vision_tower else groups


def parameter_group(name: str) -> str:
    """
    The group a parameter belongs to, from its name in the model (also inside a peft wrapper, whose names carry
    prefixes such as `base_model.model.` and `.modules_to_save.default.`). LoRA weights form their own group,
    `<group> (LoRA)`.
    """
    parts = name.split(".")
    group = next((part for part in parts if part in GROUPS), "other")
    if any(part.startswith(LORA_MARKER) for part in parts):
        return f"{group} (LoRA)"
    return group


def configure_trainable(model: nn.Module, stage: int, train_vision_tower: bool = False) -> list[TrainableRow]:
    """
    Freeze every parameter of a [`FlashSlothForConditionalGeneration`] except those of the groups `stage` trains.

    Args:
        model: the model (not wrapped by peft: for LoRA see `flashsloth.training.lora.apply_lora`).
        stage: 1 (SAP and projector) or 2 (SAP, projector, query tokens, EmbQ, language model, lm_head).
        train_vision_tower: also train the vision encoder (the HD variant's stage 2).

    Returns:
        The rows of the table of trainable parameters per group (see [`trainable_rows`]).
    """
    groups = set(stage_groups(stage, train_vision_tower))
    names = [name for name, _ in model.named_parameters()]
    if not any(parameter_group(name) in groups for name in names):
        raise ValueError(
            f"{type(model).__name__} has none of the parameter groups {sorted(groups)}: pass a FlashSloth model."
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_group(name) in groups)
    return trainable_rows(model)


def trainable_rows(model: nn.Module) -> list[TrainableRow]:
    """Trainable and total parameter counts per group, groups in forward order, then a `total` row."""
    counts: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        row = counts.setdefault(parameter_group(name), [0, 0])
        row[0] += parameter.numel() if parameter.requires_grad else 0
        row[1] += parameter.numel()
    order = {group: index for index, group in enumerate(GROUPS)}
    groups = sorted(counts, key=lambda group: (order.get(group.split(" ")[0], len(GROUPS)), group))
    rows = [TrainableRow(group, *counts[group]) for group in groups]
    rows.append(TrainableRow("total", sum(row.trainable for row in rows), sum(row.total for row in rows)))
    return rows


def format_trainable_table(model: nn.Module) -> str:
    """The table of trainable parameters per group, as printed at the start of training."""
    rows = trainable_rows(model)
    header = ("group", "trainable", "total", "trainable %")
    lines = [
        (row.group, f"{row.trainable:,}", f"{row.total:,}", f"{100 * row.trainable / max(row.total, 1):.1f}")
        for row in rows
    ]
    widths = [max(len(cells[column]) for cells in [header, *lines]) for column in range(len(header))]

    def render(cells):
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths))
        )

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), separator, *map(render, lines[:-1]), separator, render(lines[-1])])
