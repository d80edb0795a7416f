"""`flashsloth demo`, `demo-train`, `demo-eval` and `demo-ablation`: the demo model's commands."""

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

from ..cli_errors import CliError
from . import DEMO_MODEL_DIR
from .evaluation import evaluate, format_scores, plot_scores
from .recipe import EVAL_SEED, RECIPE_HELP, TRAINING_DATA, VARIANTS, check_recipe, demo_recipe_defaults, recipe_defaults
from .robustness import ROBUSTNESS_SEED, evaluate_robustness, format_robustness
from .train import train_demo_model


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="Ask the embedded demo model about a freshly drawn scene of shapes (offline, a few seconds).",
        description="Draw a random scene of coloured shapes (or take your image), ask the embedded demo model a "
        "question about it and print the question, the model's answer and, for a drawn scene, the true answer. The "
        "scenes vary as the robustness evaluation's families do: the training generator's layout, or shapes "
        "anywhere, of other sizes, on other backgrounds, outlined, blurred, JPEG-compressed, in wide or tall images, "
        "in other shades, asked in other words, or all of these at once. The demo model is a tiny FlashSloth trained "
        "from scratch on such drawings: it answers questions about the colour, shape, number, existence and position "
        "(left/right/top/bottom) of circles, squares and triangles; other questions get an answer in those words.",
    )
    demo.add_argument("--image", help="Your own image instead of a drawn scene.")
    demo.add_argument("--question", help="The question (default: a random question of --kind about the drawn scene).")
    demo.add_argument(
        "--kind",
        choices=("color", "shape", "count", "exist", "position"),
        help="Kind of the random question (default: any).",
    )
    demo.add_argument("--seed", type=int, help="Seed of the drawn scene and question (default: a random one).")
    demo.add_argument("--save-image", metavar="PATH", help="Where to save the drawn scene (default: a temporary file).")
    demo.add_argument("--model", default=str(DEMO_MODEL_DIR), help="Model folder (default: the embedded demo model).")
    demo.set_defaults(handler=run_demo)

    recipe = demo_recipe_defaults()
    train_parser = subparsers.add_parser(
        "demo-train",
        help="Reproduce the demo model: synthetic data, tokenizer, model, stages 0, 1 and 2 on the CPU.",
        description="Train a tiny FlashSloth from scratch on synthetic shape scenes: stage 0 pre-trains the encoder on "
        "the scenes' labels (standing in for SigLIP's pre-training), then the paper's two stages: stage 1 trains SAP "
        "and the projector on captions, stage 2 SAP, the projector, the query tokens, EmbQ and the language model on "
        "questions mixed with captions (the encoder stays frozen unless --train-vision-tower). Writes an HF-native "
        "folder. The defaults are the recipe of the embedded model.",
    )
    train_parser.add_argument("output", help="Folder for the trained model (must not exist, unless --force).")
    train_parser.add_argument(
        "--variant", choices=tuple(VARIANTS), default="full", help="Model variant (default: full)."
    )
    train_parser.add_argument("--work-dir", help="Folder for the generated data and runs (default: a temporary one).")
    train_parser.add_argument("--force", action="store_true", help="Replace an existing output folder.")
    train_parser.add_argument(
        "--recipe",
        choices=TRAINING_DATA,
        default="synthetic",
        help="The recipe whose defaults the options below change: synthetic (the embedded model's, on the original "
        "generator's four slots) or varied (on drawings that vary every property, see docs/demo-model.md; its "
        "full runs have not reached the embedded model's accuracy). Default: %(default)s.",
    )
    varied = recipe_defaults("varied")
    for name, value in varied.items():
        if name == "training_data":  # set by --recipe
            continue
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(value, bool) else {"type": type(value)}
        defaults = f"default: {recipe[name]}" if name in recipe else "varied recipe only"
        if recipe.get(name) != value:
            defaults += f"; varied: {value}"
        help_text = f"{RECIPE_HELP[name]} ({defaults})".replace("%", "%%")
        train_parser.add_argument(f"--{name.replace('_', '-')}", default=None, help=help_text, **kind)
    train_parser.set_defaults(handler=run_demo_train)

    eval_parser = subparsers.add_parser(
        "demo-eval",
        help="Score a model on fresh synthetic questions of each kind (exact match).",
        description="Exact-match accuracy of a model on held-out synthetic questions (colour, shape, count, "
        "existence, position), deterministic by seed; prints a table and optionally writes JSON.",
    )
    eval_parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="Model folder (default: the demo model).")
    eval_parser.add_argument("--per-kind", type=int, default=500, help="Questions of each kind (default: %(default)s).")
    eval_parser.add_argument(
        "--seed", type=int, default=EVAL_SEED, help="Seed of the questions (default: %(default)s)."
    )
    eval_parser.add_argument("--json", metavar="PATH", help="Also write the scores as JSON.")
    eval_parser.add_argument(
        "--robustness",
        action="store_true",
        help="Score drawings unlike the training generator's instead: one family per varied property (free positions, "
        "sizes, backgrounds, outlines, anti-aliasing, blur, JPEG, aspect ratios, colour shades, held-out wordings) "
        "and a mixed family, per question kind; --per-kind then counts the questions per cell.",
    )
    eval_parser.add_argument(
        "--encoder-probe",
        action="store_true",
        help="Score only the encoder, without asking questions: a linear probe learns each object's shape and colour "
        "from its mean patch feature, per family of drawing; --per-kind then counts the drawings per family. A "
        "minute on a CPU, to judge a stage 0 before the later stages.",
    )
    eval_parser.set_defaults(handler=run_demo_eval)

    ablation = subparsers.add_parser(
        "demo-ablation",
        help="Train and score the demo recipe with SAP and EmbQ, with average pooling, and without EmbQ.",
        description="Train each variant with the demo recipe and the same budget, score it on held-out questions "
        "and write a markdown table, JSON and a PNG bar chart (needs matplotlib: pip install 'flashsloth[plot]'). "
        "A variant already trained in OUTPUT/VARIANT with the same recipe is reused: an interrupted run goes on, and "
        "the variants can be trained in parallel beforehand (flashsloth demo-train OUTPUT/no-embq --variant no-embq).",
    )
    ablation.add_argument("output", help="Folder for the models, the table, the JSON and the plot.")
    ablation.add_argument("--per-kind", type=int, default=500, help="Questions of each kind (default: %(default)s).")
    ablation.add_argument(
        "--stage2-steps", type=int, default=recipe["stage2_steps"], help="Stage-2 steps of every variant."
    )
    ablation.add_argument(
        "--anneal-steps",
        type=int,
        default=recipe["anneal_steps"],
        help="Steps at the end of stage 2 of every variant (see demo-train --help).",
    )
    ablation.set_defaults(handler=run_demo_ablation)


def _load(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(model_dir).is_dir():
        raise CliError(f"model folder not found: {model_dir}")
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    return model, processor


def run_demo(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image
    from transformers.utils import logging

    from ..training import synthetic
    from ..training.varied_data import describe_varied
    from ..training.varied_scenes import render_varied_scene

    if args.image and not os.path.isfile(args.image):
        raise CliError(f"image not found: {args.image}")
    logging.disable_progress_bar()
    model, processor = _load(args.model)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(f"flashsloth-demo-{seed}")
    expected = None
    if args.image:
        try:
            image, image_path = Image.open(args.image).convert("RGB"), args.image
        except OSError as error:
            raise CliError(f"cannot read the image {args.image}: {error}") from error
        question = args.question or "How many shapes are there?"
    else:
        family, scene, (drawn_question, expected) = draw_demo_scene(rng, args.kind)
        image = render_varied_scene(scene, rng)
        image_path = args.save_image or os.path.join(tempfile.mkdtemp(prefix="flashsloth-demo-"), "scene.png")
        image.save(image_path)
        question = args.question or drawn_question
        if args.question:
            expected = None
        print(f"Scene:    {describe_varied(scene)} ({family} drawing, {scene.width}x{scene.height}, seed {seed})")
    print(f"Image:    {image_path}")
    print(f"Question: {question}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.inference_mode():
        output_ids = model.generate(**inputs, max_new_tokens=16)
    answer = processor.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"Answer:   {answer}")
    if expected is not None:
        verdict = "correct" if synthetic.normalize_answer(answer) == synthetic.normalize_answer(expected) else "wrong"
        print(f"Expected: {expected} ({verdict})")


def draw_demo_scene(rng: random.Random, kind: str | None):
    """`(family, scene, (question, answer))`: a scene of a random family of `varied_scenes` (the training generator's
    layout or one varied property, or all of them) and a question of `kind` (any kind when None) about it."""
    from ..training.synthetic import QUESTION_KINDS
    from ..training.varied_scenes import FAMILIES, ask_varied, sample_varied_scene

    family, kind = rng.choice(FAMILIES), kind or rng.choice(QUESTION_KINDS)
    while True:
        scene = sample_varied_scene(rng, family)
        pair = ask_varied(scene, kind, rng, family)
        if pair is not None:
            return family, scene, pair


def run_demo_train(args: argparse.Namespace) -> None:
    from ..conversion.export import check_output_dir

    recipe = recipe_defaults(args.recipe)
    given = {name: getattr(args, name) for name in recipe_defaults("varied") if getattr(args, name, None) is not None}
    if args.recipe == "synthetic" and set(given) - set(recipe):
        raise CliError(f"--{sorted(set(given) - set(recipe))[0].replace('_', '-')} needs --recipe varied")
    recipe.update(given)
    try:
        check_recipe(recipe)
        check_output_dir(args.output, force=args.force)
    except (FileExistsError, ValueError) as error:
        raise CliError(str(error)) from error
    with tempfile.TemporaryDirectory(prefix="flashsloth-demo-train-") as scratch:
        _, _, seconds = train_demo_model(args.output, args.work_dir or scratch, variant=args.variant, **recipe)
    print(f"Trained the {args.variant} demo model in {seconds / 60:.1f} min; saved to {args.output}")


def run_demo_eval(args: argparse.Namespace) -> None:
    if args.per_kind < 1:
        raise CliError(f"--per-kind must be at least 1, got {args.per_kind}")
    if args.robustness and args.encoder_probe:
        raise CliError("--robustness and --encoder-probe are two different evaluations; choose one")
    model, processor = _load(args.model)
    if args.encoder_probe:
        from .encoder_probe import PROBE_SEED, format_probe, probe_encoder

        scores = probe_encoder(
            model.model.vision_tower, processor.image_processor, per_family=args.per_kind, seed=args.seed + PROBE_SEED
        )
        print(format_probe(scores))
    elif args.robustness:
        scores = evaluate_robustness(model, processor, per_cell=args.per_kind, seed=args.seed + ROBUSTNESS_SEED)
        print(format_robustness(scores))
    else:
        scores = evaluate(model, processor, per_kind=args.per_kind, seed=args.seed)
        print(format_scores({Path(args.model).name: scores}))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))


def trained_variant(model_dir: Path, variant: str, recipe: dict):
    """`(model, processor, seconds)` of a variant already trained in `model_dir` with `recipe`, or `None` when the
    folder holds no model; a model trained with another recipe is an error (it would not be the same budget)."""
    if not (model_dir / "config.json").is_file():
        return None
    model, processor = _load(str(model_dir))
    trained = dict(getattr(model.config, "demo_recipe", None) or {})
    seconds = trained.pop("train_seconds", None)
    expected = {**recipe, "variant": variant}
    differences = sorted(key for key in {**trained, **expected} if trained.get(key) != expected.get(key))
    if differences:
        raise CliError(
            f"{model_dir} holds a model trained with another recipe (differs in {', '.join(differences)}); remove it "
            "or train it again with the same settings"
        )
    return model, processor, seconds


def run_demo_ablation(args: argparse.Namespace) -> None:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    recipe = {**demo_recipe_defaults(), "stage2_steps": args.stage2_steps, "anneal_steps": args.anneal_steps}
    try:
        check_recipe(recipe)
    except ValueError as error:
        raise CliError(str(error)) from error
    rows = {}
    for variant in VARIANTS:
        reused = trained_variant(output / variant, variant, recipe)
        if reused is None:
            work_dir = output / f"work-{variant}"
            model, processor, seconds = train_demo_model(output / variant, work_dir, variant=variant, **recipe)
        else:
            model, processor, seconds = reused
            print(f"{variant}: reusing the model trained in {output / variant}", flush=True)
        rows[variant] = {**evaluate(model, processor, per_kind=args.per_kind), "train_seconds": round(seconds)}
        print(f"{variant}: {100 * rows[variant]['overall']:.1f}% overall after {seconds / 60:.1f} min", flush=True)
    (output / "ablation.json").write_text(json.dumps(rows, indent=2))
    (output / "ablation.md").write_text(format_scores(rows) + "\n")
    print(format_scores(rows))
    try:
        plot_scores(rows, output / "ablation.png")
    except ImportError as error:
        raise CliError("the plot needs matplotlib: pip install 'flashsloth[plot]'") from error
