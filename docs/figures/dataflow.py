"""Draw docs/dataflow.png, the data flow of FlashSloth shown in the README (`python docs/figures/dataflow.py`)."""

from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402


# (label, shape note, colour) from left to right; the language model row is drawn below.
VISION_STEPS = [
    ("image", "any size", "#f3f3f3"),
    ("processor", "384x384 crops\n(1, or 5 for HD)", "#e8eefc"),
    ("SigLIP", "27x27 = 729\npatch features", "#e8eefc"),
    ("Spatial Attention\nPooling", "3x3 windows\n-> 81 tokens", "#fde9d9"),
    ("projector", "2-layer MLP\n-> 81 x 2560", "#fde9d9"),
]
TEXT_STEPS = [
    ("prompt", "text + 81 image\n+ 9 query tokens", "#f3f3f3"),
    ("Phi-2\nlayers 0-6", "", "#e3f4e1"),
    ("EmbQ", "9 queries read the\ninstruction + 729 features", "#fde9d9"),
    ("Phi-2\nlayers 7-31", "", "#e3f4e1"),
    ("lm_head", "next token", "#e3f4e1"),
]


def draw_row(axes, steps, y, width=2.0, gap=0.6):
    centres = []
    for index, (label, note, colour) in enumerate(steps):
        x = index * (width + gap)
        axes.add_patch(FancyBboxPatch((x, y), width, 1.0, boxstyle="round,pad=0.05", facecolor=colour, edgecolor="#555"))
        axes.text(x + width / 2, y + 0.5, label, ha="center", va="center", fontsize=10, weight="bold")
        if note:
            axes.text(x + width / 2, y - 0.35, note, ha="center", va="center", fontsize=7.5, color="#333")
        if index:
            axes.annotate("", (x - 0.05, y + 0.5), (x - gap + 0.05, y + 0.5), arrowprops=dict(arrowstyle="->"))
        centres.append(x + width / 2)
    return centres


def main(path: Path = Path(__file__).resolve().parents[1] / "dataflow.png") -> None:
    figure, axes = plt.subplots(figsize=(11, 3.6))
    top = draw_row(axes, VISION_STEPS, 2.2)
    bottom = draw_row(axes, TEXT_STEPS, 0.0)
    # Projected image tokens fill the prompt's placeholders; EmbQ also reads SigLIP's un-pooled features.
    axes.annotate("", (bottom[0] + 0.6, 1.08), (top[4], 1.5), arrowprops=dict(arrowstyle="->", color="#c0504d"))
    axes.text(top[3] + 0.3, 1.52, "image tokens fill the placeholders", fontsize=8, color="#c0504d")
    axes.annotate(
        "", (bottom[2], 1.05), (top[2], 1.75), arrowprops=dict(arrowstyle="->", color="#4f81bd", linestyle="--")
    )
    axes.text(top[2] + 0.1, 1.1, "un-pooled features", fontsize=8, color="#4f81bd")
    axes.text(0, 3.55, "FlashSloth: 90 visual tokens per image reach the language model instead of 729", fontsize=11)
    axes.set_xlim(-0.2, 13.2)
    axes.set_ylim(-0.8, 3.8)
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
