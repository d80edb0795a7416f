"""
The embedded demo model: a tiny FlashSloth trained from scratch on synthetic shapes, shipped in `demo_model/`.

`flashsloth demo` asks it about a freshly drawn scene (or your own image); `flashsloth demo-train` reproduces it
(tokenizer, model, the paper's two stages) on the CPU; `flashsloth demo-eval` scores a model on held-out questions
of each kind; `flashsloth demo-ablation` trains and scores the ablations (average pooling instead of SAP, no EmbQ).
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from ..cli_errors import CliError


DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
VARIANTS = {
    "full": {},
    "average-pooling": {"pooling_type": "average"},
    "no-embq": {"use_embedded_query": False},
}
# Seeds of the data streams; evaluation never sees a training scene.
TRAIN_SEED, EVAL_SEED = 0, 1
# The recipe's tokenizer, saved under the work folder for the training processes.
TOKENIZER_FOLDER = "tokenizer"
# The demo checkpoint's chat template is FlashSloth's with this shorter default system prompt: the original one is
# about half of every training sequence, and CPU training time grows with the sequence length.
DEMO_SYSTEM_PROMPT = "Answer questions about the shapes in the image."


def demo_recipe_defaults() -> dict:
    """The recipe `demo_model/` was trained with (every value can be changed on the `demo-train` command line)."""
    return {
        "image_size": 72,
        "patch_size": 8,
        "vocab_size": 700,
        "vision_hidden_size": 96,
        "vision_layers": 3,
        "text_hidden_size": 128,
        "text_layers": 4,
        "query_hidden_size": 128,
        "encoder_steps": 600,
        "encoder_batch_size": 64,
        "encoder_learning_rate": 1e-3,
        "stage1_samples": 12000,
        "stage1_steps": 100,
        "stage1_learning_rate": 1e-3,
        "stage2_samples": 48000,
        "stage2_turns": 1,
        "stage2_kind_mix": "color:1,shape:1,count:1,exist:1,position:1",
        "stage2_caption_samples": 12000,
        "stage2_steps": 5500,
        "stage2_learning_rate": 1e-3,
        "anneal_samples": 32000,
        "anneal_kind_mix": "color:3,shape:1,count:1,exist:2,position:4",
        "anneal_steps": 6000,
        "anneal_learning_rate": 3e-4,
        "batch_size": 16,
        "processes": 2,
        "train_vision_tower": False,
        "seed": TRAIN_SEED,
    }


RECIPE_HELP = {
    "image_size": "side of the encoder's input in pixels (scenes are drawn at twice this size, stored at this one)",
    "patch_size": "side of the encoder's patches in pixels",
    "vocab_size": "BPE vocabulary size of the tokenizer trained on the training texts",
    "vision_hidden_size": "width of the SigLIP-shaped encoder",
    "vision_layers": "encoder layers (FlashSloth reads the one before last)",
    "text_hidden_size": "width of the Phi-shaped language model",
    "text_layers": "language model layers (EmbQ runs before the middle one)",
    "query_hidden_size": "width of EmbQ's attention",
    "encoder_steps": "stage-0 steps: the encoder learns what each slot holds and where it is (0 keeps it random)",
    "encoder_batch_size": "stage-0 batch size",
    "encoder_learning_rate": "stage-0 peak learning rate",
    "stage1_samples": "caption samples generated (stage 1, stage 0's images, stage 2's caption share)",
    "stage1_steps": "stage-1 steps (SAP + projector on captions)",
    "stage1_learning_rate": "stage-1 peak learning rate",
    "stage2_samples": "question samples generated for stage 2",
    "stage2_turns": "questions per stage-2 sample: the first of a cycled kind, then follow-ups of other kinds",
    "stage2_kind_mix": "relative shares of the question kinds among the stage-2 samples' first questions",
    "stage2_caption_samples": "captions mixed into stage 2 (all of them when more than stage1_samples)",
    "stage2_steps": "stage-2 steps (SAP, projector, query tokens, EmbQ, language model)",
    "stage2_learning_rate": "stage-2 peak learning rate",
    "anneal_samples": "question samples generated for the end of stage 2",
    "anneal_kind_mix": "shares of the question kinds at the end of stage 2",
    "anneal_steps": "steps at the end of stage 2 on questions only, weighted to the kinds learnt last (0: none)",
    "anneal_learning_rate": "peak learning rate at the end of stage 2",
    "batch_size": "batch size of stages 1 and 2 (all processes together)",
    "processes": "data-parallel training processes of one torch thread each (1: one process with torch's threads)",
    "train_vision_tower": "also train the encoder in stage 2",
    "seed": "seed of the training data and the initial weights",
}


def check_recipe(recipe: dict) -> None:
    """Raise a `ValueError` naming every recipe value that cannot train (before any data is generated)."""
    from ..training import synthetic

    unknown = sorted(set(recipe) - set(RECIPE_HELP))
    problems = [f"unknown recipe keys {unknown}; the recipe has {sorted(RECIPE_HELP)}"] if unknown else []
    for name, value in recipe.items():
        if name in unknown or isinstance(value, bool) or name == "seed":
            continue
        if name.endswith("kind_mix"):
            try:
                kind_cycle(value)
            except ValueError as error:
                problems.append(f"{name}: {error}")
            continue
        if name.endswith("learning_rate"):
            if not 0 < value < float("inf"):  # also catches NaN
                problems.append(f"{name} must be a positive number, got {value!r}")
            continue
        lowest = 0 if name in ("encoder_steps", "stage2_caption_samples", "anneal_steps") else 1
        if not value >= lowest:
            problems.append(f"{name} must be at least {lowest}, got {value!r}")
    processes = recipe.get("processes", 1)
    for name in ("batch_size", "encoder_batch_size"):
        if isinstance(processes, int) and processes >= 1 and recipe.get(name, 0) % processes:
            problems.append(f"{name} ({recipe[name]}) must be a multiple of processes ({processes})")
    if not recipe.get("stage2_turns", 1) <= len(synthetic.QUESTION_KINDS):
        problems.append(f"stage2_turns is at most {len(synthetic.QUESTION_KINDS)} (one question of each kind)")
    if problems:
        raise ValueError("Bad demo recipe: " + "; ".join(problems) + ".")


def kind_cycle(kind_mix: str) -> tuple[str, ...]:
    """The question kinds that stage-2 samples cycle through for a mix such as `"color:2,count:1"` (every kind once
    per share: `("color", "color", "count")`); kinds left out of the mix get no questions."""
    from ..training.synthetic import QUESTION_KINDS

    shares = {}
    for item in str(kind_mix).split(","):
        kind, _, share = item.strip().partition(":")
        if kind not in QUESTION_KINDS or kind in shares or not share.strip().isdigit():
            raise ValueError(
                f"a kind mix must list question kinds with whole shares, like 'color:2,position:3', each kind at "
                f"most once (kinds: {', '.join(QUESTION_KINDS)}); got {kind_mix!r}"
            )
        shares[kind] = int(share)
    if not any(shares.values()):
        raise ValueError(f"a kind mix needs a kind with a share above 0, got {kind_mix!r}")
    return tuple(kind for kind, share in shares.items() for _ in range(share))


def train_demo_tokenizer(texts, vocab_size: int, model_max_length: int = 256):
    """A byte-level BPE tokenizer (Phi-2 style, no prefix space) trained on `texts` with the `tokenizers` library, with
    the FlashSloth tokens added after its vocabulary; `<|endoftext|>` (id 0) is its end-of-text, unknown and padding
    token. Training is deterministic: the same texts give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..processing import add_flashsloth_tokens

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    return add_flashsloth_tokens(tokenizer)


def demo_chat_template() -> str:
    """FlashSloth's chat template with [`DEMO_SYSTEM_PROMPT`] as its default system prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from ..processing import DEFAULT_CHAT_TEMPLATE

    (rendered,), _ = render_jinja_template(conversations=[[]], chat_template=DEFAULT_CHAT_TEMPLATE)
    default_system_prompt = rendered.strip()
    if DEFAULT_CHAT_TEMPLATE.count(f'"{default_system_prompt}"') != 1:
        raise RuntimeError("The FlashSloth chat template no longer holds its system prompt as one string literal.")
    return DEFAULT_CHAT_TEMPLATE.replace(f'"{default_system_prompt}"', f'"{DEMO_SYSTEM_PROMPT}"')


def tokenizer_corpus(records: list[dict], chat_template: str) -> list[str]:
    """The texts the demo tokenizer learns from: every training conversation as the chat template renders it (the
    system prompt, the `USER:`/`ASSISTANT:` markers and the turns), without the placeholder tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from ..training.data import llava_to_messages

    conversations = [llava_to_messages(record["conversations"], has_image="image" in record) for record in records]
    rendered, _ = render_jinja_template(conversations=conversations, chat_template=chat_template)
    return [text.replace("<image>", "").replace("<learnable>", "").replace("</s>", "") for text in rendered]


def demo_processor(tokenizer, recipe: dict):
    """The demo checkpoint's processor for a tokenizer from [`train_demo_tokenizer`] (or the folder it was saved to):
    9 visual tokens per image, the demo chat template."""
    from ..processing import build_processor

    return build_processor(
        tokenizer, image_size=recipe["image_size"], num_image_tokens_per_crop=9, chat_template=demo_chat_template()
    )


def build_demo_model(processor, recipe: dict, variant: str = "full"):
    """A randomly initialised tiny FlashSloth for `processor`: SigLIP-shaped encoder, Phi-shaped decoder."""
    from .. import FlashSlothConfig, FlashSlothForConditionalGeneration

    tokenizer = processor.tokenizer
    text_layers = recipe["text_layers"]
    config = FlashSlothConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": recipe["vision_hidden_size"],
            "intermediate_size": 2 * recipe["vision_hidden_size"],
            "num_hidden_layers": recipe["vision_layers"],
            "num_attention_heads": 4,
            "image_size": recipe["image_size"],
            "patch_size": recipe["patch_size"],
        },
        text_config={
            "model_type": "phi",
            "vocab_size": len(tokenizer),
            "hidden_size": recipe["text_hidden_size"],
            "intermediate_size": 4 * recipe["text_hidden_size"],
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "partial_rotary_factor": 0.5,
            # Phi-2's `gelu_new` as one fused kernel: the same function, 13% faster training steps here.
            "hidden_act": "gelu_pytorch_tanh",
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        query_layer_index=text_layers // 2,
        query_hidden_size=recipe["query_hidden_size"],
        image_token_id=processor.image_token_id,
        query_token_id=processor.query_token_id,
        # As Phi-2's id 764 (" ?"), the anchor of the query tokens is the question mark.
        query_anchor_token_id=tokenizer.convert_tokens_to_ids("?"),
        pad_token_id=tokenizer.pad_token_id,
        **VARIANTS[variant],
    )
    return FlashSlothForConditionalGeneration(config)


def train_demo_model(output_dir: str | os.PathLike, work_dir: str | os.PathLike, variant: str = "full", **overrides):
    """
    The whole recipe: synthetic data, tokenizer, model, stage 0 (the encoder pre-trained on the captions' scene
    labels, see `training.encoder`), stage 1 (SAP + projector on captions), stage 2 (everything but the encoder on the
    questions mixed with the captions, as LLaVA's stage-2 mix holds captions too; the encoder stays frozen as in the
    paper: trained with the rest, its features grow without bound, since FlashSloth reads them without a final
    LayerNorm, and SAP's softmax saturates), the end of stage 2 (`anneal_steps` more at a lower learning rate, on
    questions only, most of them of the kinds that are learnt last: existence and position), and the HF-native folder
    written to `output_dir`. The stages run data-parallel in `processes` worker processes of one thread each (see
    [`train_demo_stages`]). Returns `(model, processor, seconds)`.
    """
    from .. import FlashSlothForConditionalGeneration
    from ..training.trainer import save_trained_model

    recipe = {**demo_recipe_defaults(), **overrides}
    check_recipe(recipe)
    started = time.perf_counter()
    work_dir = Path(work_dir)
    data_paths = generate_recipe_data(recipe, work_dir)
    records = [record for path in data_paths if path is not None for record in relocated(path, work_dir)]
    tokenizer = train_demo_tokenizer(tokenizer_corpus(records, demo_chat_template()), recipe["vocab_size"])
    tokenizer.save_pretrained(work_dir / TOKENIZER_FOLDER)
    processor = demo_processor(tokenizer, recipe)
    stage_arguments = (recipe, variant, str(work_dir), [str(path) if path else None for path in data_paths])
    if recipe["processes"] == 1:
        model_dir = train_demo_stages(*stage_arguments)
    else:
        import torch.multiprocessing

        # Spawned, not forked: each worker starts its own torch thread pool and process group.
        torch.multiprocessing.spawn(
            _train_demo_stages_in_worker,
            args=(recipe["processes"], free_local_port(), *stage_arguments),
            nprocs=recipe["processes"],
        )
        model_dir = final_stage_dir(recipe, work_dir) / "model"
    model = FlashSlothForConditionalGeneration.from_pretrained(model_dir)
    seconds = time.perf_counter() - started
    model.config.demo_recipe = {**recipe, "variant": variant, "train_seconds": round(seconds)}
    save_trained_model(model.eval(), processor, output_dir, run_name=f"flashsloth-demo-{variant}")
    return model, processor, seconds


def final_stage_dir(recipe: dict, work_dir: Path) -> Path:
    """The run folder of the recipe's last stage (its trained model is in `model/` there)."""
    return work_dir / ("run-stage2-anneal" if recipe["anneal_steps"] else "run-stage2")


def free_local_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for the workers' rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_demo_stages_in_worker(rank: int, world_size: int, port: int, *stage_arguments) -> None:
    """One of the data-parallel workers of [`train_demo_model`]: the environment `torchrun` would give it, so that
    the `Trainer` (through accelerate) joins the gloo process group, one torch thread, then the stages."""
    import torch
    import torch.distributed

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        train_demo_stages(*stage_arguments)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train_demo_stages(recipe: dict, variant: str, work_dir: str, data_paths: list[str | None]) -> Path:
    """
    Stages 0, 1 and 2 (with its end phase) of the demo recipe on the data and tokenizer that [`train_demo_model`]
    wrote into `work_dir`; returns the folder of the final model. Run in several processes (the environment of
    `torchrun`), every stage trains data-parallel: each process takes `batch_size / processes` samples of each
    batch, and with one thread per process the result is the same bit for bit from run to run (two threads in one
    process sum in a varying order, and this recipe's plateaus amplify the difference).
    """
    from transformers import set_seed

    from ..training.data import LlavaDataset
    from ..training.encoder import SlotLabelDataset, pretrain_encoder
    from ..training.trainer import train

    work_dir = Path(work_dir)
    captions, questions, anneal_questions = (Path(path) if path else None for path in data_paths)
    caption_records = relocated(captions, work_dir)
    # Stage 2 draws from the questions and the first `stage2_caption_samples` captions shuffled together.
    mixture = caption_records[: recipe["stage2_caption_samples"]] + relocated(questions, work_dir)
    random.Random(recipe["seed"]).shuffle(mixture)
    processor = demo_processor(str(work_dir / TOKENIZER_FOLDER), recipe)
    set_seed(recipe["seed"])
    model = build_demo_model(processor, recipe, variant)
    processes = recipe["processes"]
    common = dict(
        per_device_train_batch_size=recipe["batch_size"] // processes,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        seed=recipe["seed"],
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=not sys.stderr.isatty(),
    )
    if recipe["encoder_steps"]:
        pretrain_encoder(
            model,
            SlotLabelDataset(caption_records, work_dir, processor.image_processor),
            work_dir / "run-stage0",
            max_steps=recipe["encoder_steps"],
            learning_rate=recipe["encoder_learning_rate"],
            **{
                **common,
                "per_device_train_batch_size": recipe["encoder_batch_size"] // processes,
                "weight_decay": 0.01,
            },
        )
    model = train(
        model,
        processor,
        LlavaDataset(captions),
        work_dir / "run-stage1",
        stage=1,
        max_steps=recipe["stage1_steps"],
        learning_rate=recipe["stage1_learning_rate"],
        **common,
    )
    # Stage 2, then its end phase: (run folder, records, steps, peak learning rate).
    stage2_phases = [("run-stage2", mixture, recipe["stage2_steps"], recipe["stage2_learning_rate"])]
    if recipe["anneal_steps"]:
        anneal_records = relocated(anneal_questions, work_dir)
        stage2_phases.append(
            ("run-stage2-anneal", anneal_records, recipe["anneal_steps"], recipe["anneal_learning_rate"])
        )
    for run_name, phase_records, steps, learning_rate in stage2_phases:
        model = train(
            model,
            processor,
            LlavaDataset(phase_records, image_folder=work_dir),
            work_dir / run_name,
            stage=2,
            train_vision_tower=recipe["train_vision_tower"],
            max_steps=steps,
            learning_rate=learning_rate,
            **common,
        )
    return final_stage_dir(recipe, work_dir) / "model"


def generate_recipe_data(recipe: dict, work_dir: Path) -> tuple[Path, Path, Path | None]:
    """
    The recipe's three datasets under `work_dir`: captions (`stage1/`), stage-2 questions (`stage2/`) and, with an end
    phase, its own questions of other scenes (`stage2-anneal/`, seed + 1). Returns their JSON paths (`None` for the
    end phase when there is none). Each dataset has its own random stream, so the files are the same whichever process
    writes them: two worker processes write the three (where the platform can fork), the largest alone. Scenes are
    drawn at twice the encoder's input side and stored downscaled as the processor would (the same pixel values, but
    every training step reads and decodes a quarter of the pixels).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_all_start_methods, get_context

    from ..training import synthetic

    common = {"image_size": 2 * recipe["image_size"], "save_size": recipe["image_size"]}
    jobs = {
        "questions": (
            work_dir / "stage2",
            recipe["stage2_samples"],
            {
                "stage": 2,
                "seed": recipe["seed"],
                "kinds": kind_cycle(recipe["stage2_kind_mix"]),
                "turns": recipe["stage2_turns"],
                **common,
            },
        ),
        "captions": (work_dir / "stage1", recipe["stage1_samples"], {"stage": 1, "seed": recipe["seed"], **common}),
    }
    if recipe["anneal_steps"]:
        jobs["anneal"] = (
            work_dir / "stage2-anneal",
            recipe["anneal_samples"],
            {"stage": 2, "seed": recipe["seed"] + 1, "kinds": kind_cycle(recipe["anneal_kind_mix"]), **common},
        )
    if "fork" in get_all_start_methods():
        # Forked workers draw and write images only (PIL, zlib): nothing in them touches torch's thread pools, and
        # unlike "spawn" a fork does not re-run the caller's script, which may not guard its `__main__`.
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("fork")) as pool:
            futures = {
                name: pool.submit(synthetic.generate_dataset, folder, count, **kwargs)
                for name, (folder, count, kwargs) in jobs.items()
            }
            paths = {name: future.result() for name, future in futures.items()}
    else:
        paths = {
            name: synthetic.generate_dataset(folder, count, **kwargs) for name, (folder, count, kwargs) in jobs.items()
        }
    return paths["captions"], paths["questions"], paths.get("anneal")


def relocated(json_path: Path, root: Path) -> list[dict]:
    """The records of a generated dataset with image paths relative to `root` instead of the JSON's folder."""
    prefix = json_path.parent.relative_to(root)
    return [{**record, "image": str(prefix / record["image"])} for record in json.loads(json_path.read_text())]


def evaluate(model, processor, per_kind: int = 500, seed: int = EVAL_SEED, batch_size: int = 50) -> dict:
    """Exact-match accuracy per question kind on `per_kind` fresh synthetic questions of each kind (deterministic by
    `seed`); returns `{"per_kind": {kind: accuracy}, "overall": accuracy, "counts": {kind: n}}`."""
    import torch
    from tqdm.auto import tqdm

    from ..training import synthetic

    image_size = processor.image_processor.size["height"]
    rng = random.Random(f"flashsloth-demo-eval-{seed}")
    samples = []
    for kind in synthetic.QUESTION_KINDS:
        for index in range(per_kind):
            scene, record = synthetic.make_sample(index, 2, rng, kinds=(kind,))
            samples.append((synthetic.render_scene(scene, 2 * image_size, rng), record))
    correct = dict.fromkeys(synthetic.QUESTION_KINDS, 0)
    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluating", disable=not sys.stderr.isatty()):
        batch = samples[start : start + batch_size]
        prompts = [processor.apply_chat_template(question_messages(record), add_generation_prompt=True) for _, record in batch]
        inputs = processor(images=[[image] for image, _ in batch], text=prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            output_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answers = processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for answer, (_, record) in zip(answers, batch):
            expected = record["conversations"][1]["value"]
            correct[record["kind"]] += synthetic.normalize_answer(answer) == synthetic.normalize_answer(expected)
    per_kind_accuracy = {kind: correct[kind] / per_kind for kind in synthetic.QUESTION_KINDS}
    return {
        "per_kind": per_kind_accuracy,
        "overall": sum(correct.values()) / (per_kind * len(correct)),
        "counts": dict.fromkeys(synthetic.QUESTION_KINDS, per_kind),
    }


def question_messages(record: dict) -> list[dict]:
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="Ask the embedded demo model about a freshly drawn scene of shapes (offline, a few seconds).",
        description="Draw a random scene of coloured shapes (or take your image), ask the embedded demo model a "
        "question about it and print the question, the model's answer and, for a drawn scene, the true answer. The "
        "demo model is a tiny FlashSloth trained from scratch on such scenes: it answers questions about the colour, "
        "shape, number, existence and position (left/right/top/bottom) of circles, squares and triangles.",
    )
    demo.add_argument("--image", help="Your own image instead of a drawn scene.")
    demo.add_argument(
        "--question", help="The question (default: a random question of --kind about the drawn scene)."
    )
    demo.add_argument(
        "--kind",
        choices=("color", "shape", "count", "exist", "position"),
        help="Kind of the random question (default: any).",
    )
    demo.add_argument("--seed", type=int, help="Seed of the drawn scene and question (default: a random one).")
    demo.add_argument("--save-image", metavar="PATH", help="Where to save the drawn scene (default: a temporary file).")
    demo.add_argument(
        "--model", default=str(DEMO_MODEL_DIR), help="Model folder (default: the embedded demo model)."
    )
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
    train_parser.add_argument("--variant", choices=tuple(VARIANTS), default="full", help="Model variant (default: full).")
    train_parser.add_argument("--work-dir", help="Folder for the generated data and runs (default: a temporary one).")
    train_parser.add_argument("--force", action="store_true", help="Replace an existing output folder.")
    for name, value in recipe.items():
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(value, bool) else {"type": type(value)}
        help_text = f"{RECIPE_HELP[name]} (default: %(default)s)"
        train_parser.add_argument(f"--{name.replace('_', '-')}", default=value, help=help_text, **kind)
    train_parser.set_defaults(handler=run_demo_train)

    eval_parser = subparsers.add_parser(
        "demo-eval",
        help="Score a model on fresh synthetic questions of each kind (exact match).",
        description="Exact-match accuracy of a model on held-out synthetic questions (colour, shape, count, "
        "existence, position), deterministic by seed; prints a table and optionally writes JSON.",
    )
    eval_parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="Model folder (default: the demo model).")
    eval_parser.add_argument("--per-kind", type=int, default=500, help="Questions of each kind (default: %(default)s).")
    eval_parser.add_argument("--seed", type=int, default=EVAL_SEED, help="Seed of the questions (default: %(default)s).")
    eval_parser.add_argument("--json", metavar="PATH", help="Also write the scores as JSON.")
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
        kinds = (args.kind,) if args.kind else synthetic.QUESTION_KINDS
        scene, record = synthetic.make_sample(rng.randrange(len(kinds)), 2, rng, kinds=kinds)
        image = synthetic.render_scene(scene, 4 * processor.image_processor.size["height"], rng)
        image_path = args.save_image or os.path.join(tempfile.mkdtemp(prefix="flashsloth-demo-"), "scene.png")
        image.save(image_path)
        question = args.question or question_messages(record)[0]["content"][1]["text"]
        if not args.question:
            expected = record["conversations"][1]["value"]
        print(f"Scene:    {synthetic.describe(scene)} (seed {seed})")
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


def run_demo_train(args: argparse.Namespace) -> None:
    from ..conversion.export import check_output_dir

    recipe = {name: getattr(args, name) for name in demo_recipe_defaults()}
    try:
        check_recipe(recipe)
        check_output_dir(args.output, force=args.force)
    except (FileExistsError, ValueError) as error:
        raise CliError(str(error)) from error
    with tempfile.TemporaryDirectory(prefix="flashsloth-demo-train-") as scratch:
        _, _, seconds = train_demo_model(args.output, args.work_dir or scratch, variant=args.variant, **recipe)
    print(f"Trained the {args.variant} demo model in {seconds / 60:.1f} min; saved to {args.output}")


def format_scores(rows: dict[str, dict]) -> str:
    """A markdown table of accuracies: one row per model, one column per question kind."""
    from ..training.synthetic import QUESTION_KINDS

    lines = ["| model | " + " | ".join(QUESTION_KINDS) + " | overall |", "|---" * (len(QUESTION_KINDS) + 2) + "|"]
    for name, scores in rows.items():
        cells = [f"{100 * scores['per_kind'][kind]:.1f}%" for kind in QUESTION_KINDS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * scores['overall']:.1f}% |")
    return "\n".join(lines)


def run_demo_eval(args: argparse.Namespace) -> None:
    if args.per_kind < 1:
        raise CliError(f"--per-kind must be at least 1, got {args.per_kind}")
    model, processor = _load(args.model)
    scores = evaluate(model, processor, per_kind=args.per_kind, seed=args.seed)
    print(format_scores({Path(args.model).name: scores}))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))


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
