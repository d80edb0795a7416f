"""Training the demo model from scratch: the recipe's synthetic data, then stages 0, 1 and 2 in data-parallel worker
processes, then the HF-native checkpoint folder."""

import json
import os
import random
import sys
import time
from pathlib import Path

from .recipe import (
    build_demo_model,
    check_recipe,
    demo_chat_template,
    demo_processor,
    kind_cycle,
    recipe_defaults,
    tokenizer_corpus,
    train_demo_tokenizer,
)

# The recipe's tokenizer, saved under the work folder for the training processes.
TOKENIZER_FOLDER = "tokenizer"


def train_demo_model(output_dir: str | os.PathLike, work_dir: str | os.PathLike, variant: str = "full", **overrides):
    """
    The whole recipe: synthetic data (or varied drawings, `training_data="varied"`), tokenizer, model, stage 0 (the
    encoder pre-trained on the captions' scene labels, see `training.encoder`, or on every drawing's geometry, see
    `training.encoder_geometry`), stage 1 (SAP + projector on captions), stage 2 (everything but the encoder on the
    questions mixed with the captions, as LLaVA's stage-2 mix holds captions too; the encoder stays frozen as in the
    paper: trained with the rest, its features grow without bound, since FlashSloth reads them without a final
    LayerNorm, and SAP's softmax saturates), the end of stage 2 (`anneal_steps` more at a lower learning rate, on
    questions only, most of them of the kinds that are learnt last: existence and position), and the HF-native folder
    written to `output_dir`. The stages run data-parallel in `processes` worker processes of one thread each (see
    [`train_demo_stages`]). Returns `(model, processor, seconds)`.
    """
    from .. import FlashSlothForConditionalGeneration
    from ..training.trainer import save_trained_model

    recipe = {**recipe_defaults(overrides.get("training_data", "synthetic")), **overrides}
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
    from ..training.encoder_geometry import PatchClassifier, PatchLabelDataset
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
        if recipe.get("training_data") == "varied":
            # Free layouts have no slots: every patch is labelled from the geometry, on every drawing of stages 1-2.
            encoder_data = PatchLabelDataset(
                encoder_records(caption_records + mixture),
                work_dir,
                processor.image_processor,
                model.config.patch_grid_size,
            )
            classifier = PatchClassifier(model.model.vision_tower)
        else:
            encoder_data, classifier = SlotLabelDataset(caption_records, work_dir, processor.image_processor), None
        pretrain_encoder(
            model,
            encoder_data,
            work_dir / "run-stage0",
            classifier=classifier,
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
    """The recipe's captions, stage-2 questions and end-phase questions (JSON paths; `None` for the end phase when
    there is none): from the synthetic generator ([`generate_synthetic_data`]) or, with `training_data="varied"`, on
    varied drawings ([`generate_varied_data`])."""
    if recipe.get("training_data") == "varied":
        return generate_varied_data(recipe, work_dir)
    return generate_synthetic_data(recipe, work_dir)


def generate_synthetic_data(recipe: dict, work_dir: Path) -> tuple[Path, Path, Path | None]:
    """
    The recipe's three datasets under `work_dir`: captions (`stage1/`), stage-2 questions (`stage2/`) and, with an end
    phase, its own questions of other scenes (`stage2-anneal/`, seed + 1). Returns their JSON paths (`None` for the
    end phase when there is none). Each dataset has its own random stream, so the files are the same whichever process
    writes them: two worker processes write the three (where the platform can fork), the largest alone. Scenes are
    drawn at twice the encoder's input side and stored downscaled as the processor would (the same pixel values, but
    every training step reads and decodes a quarter of the pixels).
    """
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
    return write_datasets(synthetic.generate_dataset, jobs)


def generate_varied_data(recipe: dict, work_dir: Path) -> tuple[Path, Path, Path | None]:
    """
    The recipe's three datasets under `work_dir`, on varied drawings (`training.varied_data`: `base_share` of them
    the `synthetic` generator's layout, the others varying each property with probability `vary_share`, questions
    in training wordings): captions (`stage1/`), stage-2 questions (`stage2/`) and, with an end phase, its own
    questions of other scenes (`stage2-anneal/`, seed + 1), up to `questions_per_image` questions about one drawing.
    Returns their JSON paths (`None` for the end phase when there is none). Each dataset has its own random stream,
    so the files are the same whichever process writes them: two worker processes write the three (where the
    platform can fork), the largest alone. Drawings are stored squashed to the encoder's square input as the processor
    would (the same pixel values, and every training step reads and decodes only those pixels).
    """
    from ..training import varied_data

    common = {
        "save_size": recipe["image_size"],
        "base_share": recipe["base_share"],
        "vary_share": recipe["vary_share"],
    }
    questions = {"stage": 2, "questions_per_image": recipe["questions_per_image"], **common}
    jobs = {
        "questions": (
            work_dir / "stage2",
            recipe["stage2_samples"],
            {"seed": recipe["seed"], "kinds": kind_cycle(recipe["stage2_kind_mix"]), **questions},
        ),
        "captions": (work_dir / "stage1", recipe["stage1_samples"], {"stage": 1, "seed": recipe["seed"], **common}),
    }
    if recipe["anneal_steps"]:
        jobs["anneal"] = (
            work_dir / "stage2-anneal",
            recipe["anneal_samples"],
            {"seed": recipe["seed"] + 1, "kinds": kind_cycle(recipe["anneal_kind_mix"]), **questions},
        )
    return write_datasets(varied_data.generate_varied_dataset, jobs)


def encoder_records(records: list[dict]) -> list[dict]:
    """Stage 0's records: one of each drawing (questions about one drawing share it), in a fixed order."""
    return list({record["image"]: record for record in records}.values())


def write_datasets(generate, jobs: dict) -> tuple[Path, Path, Path | None]:
    """Run `generate(folder, count, **kwargs)` for each job `name -> (folder, count, kwargs)`, in two worker processes
    where the platform can fork; returns the captions', questions' and (or None) end phase's JSON paths."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_all_start_methods, get_context

    if "fork" in get_all_start_methods():
        # Forked workers draw and write images only (PIL, zlib): nothing in them touches torch's thread pools, and
        # unlike "spawn" a fork does not re-run the caller's script, which may not guard its `__main__`.
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("fork")) as pool:
            futures = {
                name: pool.submit(generate, folder, count, **kwargs) for name, (folder, count, kwargs) in jobs.items()
            }
            paths = {name: future.result() for name, future in futures.items()}
    else:
        paths = {name: generate(folder, count, **kwargs) for name, (folder, count, kwargs) in jobs.items()}
    return paths["captions"], paths["questions"], paths.get("anneal")


def relocated(json_path: Path, root: Path) -> list[dict]:
    """The records of a generated dataset with image paths relative to `root` instead of the JSON's folder."""
    prefix = json_path.parent.relative_to(root)
    return [{**record, "image": str(prefix / record["image"])} for record in json.loads(json_path.read_text())]
