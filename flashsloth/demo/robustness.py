"""How well a model answers about drawings unlike its training generator's: accuracy per question kind and per family
of drawing (`flashsloth.training.varied_scenes`), as a table and JSON (`flashsloth demo-eval --robustness`)."""

import random

from .evaluation import score_samples


# The goal: at least this accuracy in every cell (family x kind), not only on average.
CELL_GOAL = 0.95
ROBUSTNESS_SEED = 2  # the questions of `evaluate` use EVAL_SEED; training uses TRAIN_SEED


def evaluate_robustness(model, processor, per_cell: int = 100, seed: int = ROBUSTNESS_SEED, batch_size: int = 50):
    """
    Exact-match accuracy on `per_cell` fresh questions for every family of drawing and question kind, deterministic by
    `seed`. Returns `{"cells": {family: {kind: accuracy}}, "per_family": {...}, "per_kind": {...}, "overall": float,
    "per_cell": int, "goal": CELL_GOAL, "cells_meeting_goal": int, "cells_total": int}`.
    """
    from ..training.synthetic import QUESTION_KINDS
    from ..training.varied_scenes import FAMILIES, make_varied_sample

    rng = random.Random(f"flashsloth-demo-robustness-{seed}")
    samples = [
        make_varied_sample(index, rng, family, kind)
        for family in FAMILIES
        for kind in QUESTION_KINDS
        for index in range(per_cell)
    ]
    correct = {family: dict.fromkeys(QUESTION_KINDS, 0) for family in FAMILIES}
    for record, right in score_samples(model, processor, samples, batch_size, "robustness"):
        correct[record["family"]][record["kind"]] += right
    cells = {family: {kind: hits / per_cell for kind, hits in kinds.items()} for family, kinds in correct.items()}
    flat = [accuracy for kinds in cells.values() for accuracy in kinds.values()]
    return {
        "cells": cells,
        "per_family": {family: sum(kinds.values()) / len(kinds) for family, kinds in cells.items()},
        "per_kind": {kind: sum(cells[family][kind] for family in FAMILIES) / len(FAMILIES) for kind in QUESTION_KINDS},
        "overall": sum(flat) / len(flat),
        "per_cell": per_cell,
        "goal": CELL_GOAL,
        "cells_meeting_goal": sum(accuracy >= CELL_GOAL for accuracy in flat),
        "cells_total": len(flat),
    }


def format_robustness(scores: dict) -> str:
    """A markdown table: one row per family of drawing, one column per question kind, cells below the goal in bold."""
    kinds = list(scores["per_kind"])
    lines = ["| family | " + " | ".join(kinds) + " | all kinds |", "|---" + "|---:" * (len(kinds) + 1) + "|"]

    def cell(accuracy: float) -> str:
        text = f"{100 * accuracy:.1f}%"
        return text if accuracy >= scores["goal"] else f"**{text}**"

    for family, row in scores["cells"].items():
        lines.append(
            f"| {family} | "
            + " | ".join(cell(row[kind]) for kind in kinds)
            + f" | {cell(scores['per_family'][family])} |"
        )
    lines.append(
        "| all families | "
        + " | ".join(cell(scores["per_kind"][kind]) for kind in kinds)
        + f" | {cell(scores['overall'])} |"
    )
    lines.append("")
    lines.append(
        f"{scores['cells_meeting_goal']} of {scores['cells_total']} cells reach the goal of {100 * scores['goal']:.0f} % "
        f"(bold: below it); {scores['per_cell']} questions per cell."
    )
    return "\n".join(lines)
