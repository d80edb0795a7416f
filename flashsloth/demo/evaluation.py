"""Scoring a model on fresh synthetic questions of each kind (exact match), as a table and a chart."""

import os
import random
import sys

from .recipe import EVAL_SEED


def evaluate(model, processor, per_kind: int = 500, seed: int = EVAL_SEED, batch_size: int = 50) -> dict:
    """Exact-match accuracy per question kind on `per_kind` fresh synthetic questions of each kind (deterministic by
    `seed`); returns `{"per_kind": {kind: accuracy}, "overall": accuracy, "counts": {kind: n}}`."""
    from ..training import synthetic

    image_size = processor.image_processor.size["height"]
    rng = random.Random(f"flashsloth-demo-eval-{seed}")
    samples = []
    for kind in synthetic.QUESTION_KINDS:
        for index in range(per_kind):
            scene, record = synthetic.make_sample(index, 2, rng, kinds=(kind,))
            samples.append((synthetic.render_scene(scene, 2 * image_size, rng), record))
    correct = dict.fromkeys(synthetic.QUESTION_KINDS, 0)
    for record, right in score_samples(model, processor, samples, batch_size, "evaluating"):
        correct[record["kind"]] += right
    per_kind_accuracy = {kind: correct[kind] / per_kind for kind in synthetic.QUESTION_KINDS}
    return {
        "per_kind": per_kind_accuracy,
        "overall": sum(correct.values()) / (per_kind * len(correct)),
        "counts": dict.fromkeys(synthetic.QUESTION_KINDS, per_kind),
    }


def score_samples(model, processor, samples: list, batch_size: int, description: str):
    """Greedy answers to `(image, record)` samples in batches; yields `(record, answer_is_right)` (exact match after
    `normalize_answer`), with a progress bar on a terminal."""
    import torch
    from tqdm.auto import tqdm

    from ..training.synthetic import normalize_answer

    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc=description, disable=not sys.stderr.isatty()):
        batch = samples[start : start + batch_size]
        prompts = [
            processor.apply_chat_template(question_messages(record), add_generation_prompt=True) for _, record in batch
        ]
        inputs = processor(images=[[image] for image, _ in batch], text=prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            output_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answers = processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for answer, (_, record) in zip(answers, batch):
            yield record, normalize_answer(answer) == normalize_answer(record["conversations"][1]["value"])


def question_messages(record: dict) -> list[dict]:
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def format_scores(rows: dict[str, dict]) -> str:
    """A markdown table of accuracies: one row per model, one column per question kind."""
    from ..training.synthetic import QUESTION_KINDS

    lines = ["| model | " + " | ".join(QUESTION_KINDS) + " | overall |", "|---" * (len(QUESTION_KINDS) + 2) + "|"]
    for name, scores in rows.items():
        cells = [f"{100 * scores['per_kind'][kind]:.1f}%" for kind in QUESTION_KINDS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * scores['overall']:.1f}% |")
    return "\n".join(lines)


def plot_scores(rows: dict[str, dict], path: str | os.PathLike) -> None:
    """Grouped bars: accuracy per question kind for each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.synthetic import QUESTION_KINDS

    figure, axes = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for offset, (name, scores) in enumerate(rows.items()):
        positions = [index + offset * width for index in range(len(QUESTION_KINDS))]
        axes.bar(positions, [100 * scores["per_kind"][kind] for kind in QUESTION_KINDS], width, label=name)
    axes.set_xticks([index + 0.4 - width / 2 for index in range(len(QUESTION_KINDS))], QUESTION_KINDS)
    axes.set_ylabel("exact match (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Demo recipe ablation: held-out synthetic questions")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
