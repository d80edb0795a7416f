"""The demo model's recipe: its defaults and their checks, and the tokenizer, processor and model it builds."""

VARIANTS = {
    "full": {},
    "average-pooling": {"pooling_type": "average"},
    "no-embq": {"use_embedded_query": False},
}


# Seeds of the data streams; evaluation never sees a training scene.
TRAIN_SEED, EVAL_SEED = 0, 1


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


# The recipe on varied drawings (`demo-train --recipe varied`): the defaults with these changes. Its full runs have not
# reached the embedded model's accuracy (docs/demo-model.md), so it is not the default. A longer stage 0 at a higher
# learning rate is what puts shape into the encoder's patches on these drawings; the full 6000-step end phase is what
# lifts existence questions off their plateau.
VARIED_RECIPE = {
    "training_data": "varied",
    "base_share": 0.25,
    "vary_share": 0.7,
    "questions_per_image": 2,
    "encoder_steps": 2000,
    "encoder_learning_rate": 3e-3,
}
TRAINING_DATA = ("synthetic", "varied")


def recipe_defaults(name: str = "synthetic") -> dict:
    """The defaults of a named recipe: "synthetic" (the embedded model's, [`demo_recipe_defaults`]) or "varied"
    (the same on varied drawings, [`VARIED_RECIPE`])."""
    if name not in TRAINING_DATA:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {TRAINING_DATA}.")
    return demo_recipe_defaults() if name == "synthetic" else {**demo_recipe_defaults(), **VARIED_RECIPE}


RECIPE_HELP = {
    "image_size": "side of the encoder's input in pixels (synthetic scenes are drawn at twice this size, stored at "
    "this one; varied drawings are stored squashed to this square)",
    "patch_size": "side of the encoder's patches in pixels",
    "vocab_size": "BPE vocabulary size of the tokenizer trained on the training texts",
    "vision_hidden_size": "width of the SigLIP-shaped encoder",
    "vision_layers": "encoder layers (FlashSloth reads the one before last)",
    "text_hidden_size": "width of the Phi-shaped language model",
    "text_layers": "language model layers (EmbQ runs before the middle one)",
    "query_hidden_size": "width of EmbQ's attention",
    "training_data": "synthetic: the original generator's four slots; varied: drawings of training.varied_data",
    "base_share": "varied data: share of drawings in the synthetic generator's own layout (four slots, light grey)",
    "vary_share": "varied data: probability that each other drawing varies each property (layout, size, ...)",
    "questions_per_image": "varied data: stage-2 questions (records) about one drawing, at most",
    "encoder_steps": "stage-0 steps: the encoder learns what each slot holds and where it is, or with varied data "
    "what object covers each patch and where (0 keeps it random)",
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
        if name == "training_data":
            if value not in TRAINING_DATA:
                problems.append(f"training_data must be one of {TRAINING_DATA}, got {value!r}")
            continue
        if name in ("base_share", "vary_share"):
            if not 0 <= value <= 1:
                problems.append(f"{name} is a probability (0 to 1), got {value!r}")
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
    if recipe.get("training_data") == "varied" and recipe.get("stage2_turns", 1) != 1:
        problems.append("varied data asks one question per record: stage2_turns must be 1")
    grid = recipe.get("image_size", 0) // max(recipe.get("patch_size", 1), 1)
    if recipe.get("image_size", 0) % max(recipe.get("patch_size", 1), 1) or grid % 3 or not grid:
        problems.append(
            f"image_size ({recipe.get('image_size')}) must be a multiple of patch_size ({recipe.get('patch_size')}) "
            "whose patch grid a 3 x 3 tiling of SAP windows divides (a grid side that is a multiple of 3)"
        )
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
        # SAP's windows tile the patch grid 3 x 3: 9 visual tokens per image, as `demo_processor` expects.
        pooling_window=recipe["image_size"] // recipe["patch_size"] // 3,
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
