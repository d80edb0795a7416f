"""
The embedded demo model: a tiny FlashSloth trained from scratch on drawn shapes, shipped in `model/`.

`flashsloth demo` asks it about a freshly drawn scene of any family of `training.varied_scenes` (or your own
image); `flashsloth demo-train` reproduces it (tokenizer, model, the paper's two stages) on the CPU; `flashsloth
demo-eval` scores a model on held-out questions of each kind (`--robustness`: per family of drawing too);
`flashsloth demo-ablation` trains and scores the ablations (average pooling instead of SAP, no EmbQ).

Modules: `recipe` (the recipe and what it builds), `train` (the training run), `evaluation` (the scores),
`robustness` (the scores per family of drawing), `cli` (the commands). torch and transformers are imported only when
a command runs.
"""

from pathlib import Path


DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"

from .evaluation import evaluate, format_scores, plot_scores, question_messages  # noqa: E402
from .recipe import (  # noqa: E402
    DEMO_SYSTEM_PROMPT,
    EVAL_SEED,
    TRAIN_SEED,
    VARIANTS,
    build_demo_model,
    check_recipe,
    demo_chat_template,
    demo_processor,
    demo_recipe_defaults,
    kind_cycle,
    tokenizer_corpus,
    train_demo_tokenizer,
)
from .train import generate_recipe_data, train_demo_model  # noqa: E402
from .cli import add_commands, trained_variant  # noqa: E402
