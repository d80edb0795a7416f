"""How well a model answers about drawings unlike its training generator's: accuracy per question kind and per family
of drawing (`flashsloth.training.varied_scenes`), as a table and JSON (`flashsloth demo-eval --robustness`)."""

import random
import sys

from .evaluation import question_messages


# The goal: at least this accuracy in every cell (family x kind), not only on average.
CELL_GOAL = 0.95
ROBUSTNESS_SEED = 2  # the questions of `evaluate` use EVAL_SEED; training uses TRAIN_SEED


def evaluate_robustness(model, processor, per_cell: int = 100, seed: int = ROBUSTNESS_SEED, batch_size: int = 50):
    """
    Exact-match accuracy on `per_cell` fresh questions for every family of drawing and question kind, deterministic by
    `seed`. Returns `{"cells": {family: {kind: accuracy}}, "per_family": {...}, "per_kind": {...}, "overall": float,
    "per_cell": int, "goal": CELL_GOAL, "cells_meeting_goal": int, "cells_total": int}`.
    """
    import torch
    from tqdm.auto import tqdm

    from ..training.synthetic import QUESTION_KINDS, normalize_answer
    from ..training.varied_scenes import FAMILIES, make_varied_sample

    rng = random.Random(f"flashsloth-demo-robustness-{seed}")
    samples = [
        make_varied_sample(index, rng, family, kind)
        for family in FAMILIES
        for kind in QUESTION_KINDS
        for index in range(per_cell)
    ]
    correct = {family: dict.fromkeys(QUESTION_KINDS, 0) for family in FAMILIES}
    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc="robustness", disable=not sys.stderr.isatty()):
        batch = samples[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(question_messages(record), add_generation_prompt=True) for _, record in batch
        ]
        inputs = processor(images=[[image] for image, _ in batch], text=prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            output_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answers = processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for answer, (_, record) in zip(answers, batch):
            expected = record["conversations"][1]["value"]
            correct[record["family"]][record["kind"]] += normalize_answer(answer) == normalize_answer(expected)
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
