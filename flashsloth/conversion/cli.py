"""`flashsloth convert` and `flashsloth build`: make HF-native FlashSloth checkpoint folders, optionally pushed to the
Hub.

Only argparse at import time: torch and transformers are imported when a command runs.
"""

import argparse
import json

from flashsloth.cli_errors import CliError


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# Errors that mean bad input or a bad environment (paths, files, options, network, disk): one line, no traceback.
USER_ERRORS = (OSError, ValueError, ImportError)


def _output_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--force",
        action="store_true",
        help="Replace DST if it exists and is not empty (the old folder stays complete until the new one is).",
    )
    options.add_argument(
        "--max-shard-size",
        default="2GB",
        metavar="SIZE",
        help="Largest safetensors shard, e.g. 500MB, 5GB (default: %(default)s).",
    )
    hub = options.add_argument_group("Hub upload")
    hub.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="Upload DST to this Hub model repository (owner/name; created if needed; needs `hf auth login` or "
        "HF_TOKEN). The model card's examples then name REPO.",
    )
    hub.add_argument("--revision", help="Branch to upload to (created if needed; default: main). Needs --push-to-hub.")
    hub.add_argument("--commit-message", help="Commit message of the upload. Needs --push-to-hub.")
    hub.add_argument("--private", action="store_true", help="Create REPO as a private repository. Needs --push-to-hub.")
    hub.add_argument(
        "--dry-run",
        action="store_true",
        help="Write DST but upload nothing: list the files --push-to-hub would upload.",
    )
    return options


def _add_output_dir(parser: argparse.ArgumentParser):
    parser.add_argument(
        "output_dir", metavar="DST", help="Folder to create (written as a temporary sibling, then renamed)."
    )


def add_commands(subparsers) -> None:
    output_options = _output_options()
    convert = subparsers.add_parser(
        "convert",
        parents=[output_options],
        help="Convert a released FlashSloth checkpoint (original research-code format) into an HF-native folder.",
        description="Convert a released FlashSloth checkpoint (Tongbo/FlashSloth-3.2B, Tongbo/FlashSloth_HD-3.2B, "
        "Tongbo/FlashSloth-3.2B-Stage1, or a folder laid out like them) into an HF-native folder that loads with "
        "the Auto classes and trust_remote_code=True. The weights stream tensor by tensor; every source tensor must "
        "map to a FlashSloth tensor and every FlashSloth tensor must be filled, otherwise nothing is written. HD and "
        "the aspect-ratio mode come from the source config (image_hd, image_aspect_ratio). The source is only read.",
    )
    convert.add_argument(
        "source",
        metavar="SRC",
        help="Original-format checkpoint: a local folder, or a Hub repository id (downloaded with huggingface_hub; "
        "offline, it must be in the local cache).",
    )
    _add_output_dir(convert)
    convert.add_argument(
        "--source-revision", metavar="REV", help="Hub revision (branch, tag or commit) of SRC (default: main)."
    )
    convert.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Dtype of the written weights; 'auto' keeps the source config's torch_dtype (default: %(default)s).",
    )
    convert.add_argument(
        "--vision-config",
        metavar="FILE",
        help="SigLIP config (JSON) of the source's vision tower. Default: vision_config.json beside the source "
        "config.json, else the published config of the Hub id in mm_vision_tower (google/siglip-so400m-patch14-384).",
    )
    convert.add_argument(
        "--tokenizer", metavar="DIR_OR_REPO", help="Tokenizer to use instead of the one in SRC."
    )
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Accept .bin weight files when SRC has no safetensors (read with torch.load(weights_only=True)).",
    )
    convert.set_defaults(handler=run_convert)

    build = subparsers.add_parser(
        "build",
        parents=[output_options],
        help="Build a new FlashSloth from a SigLIP encoder and a language model (the paper's stage 0).",
        description="Build a new FlashSloth from a pretrained SigLIP encoder and a pretrained decoder-only language "
        "model (Phi-2, or e.g. a Llama-family model): their weights are kept, SAP, the projector, the query tokens "
        "and EmbQ are freshly initialised, the tokenizer gets the <learnable>, </s> and <image> tokens. The result "
        "is ready for training.",
    )
    _add_output_dir(build)
    build.add_argument(
        "--vision",
        required=True,
        metavar="DIR_OR_REPO",
        help="SigLIP checkpoint, e.g. google/siglip-so400m-patch14-384.",
    )
    build.add_argument("--text", required=True, metavar="DIR_OR_REPO", help="Language model, e.g. microsoft/phi-2.")
    build.add_argument(
        "--tokenizer", metavar="DIR_OR_REPO", help="Tokenizer (default: the language model's)."
    )
    build.add_argument("--hd", action="store_true", help="Five crops per image (FlashSloth-HD) instead of one.")
    build.add_argument(
        "--image-aspect-ratio",
        choices=("square", "pad"),
        default="square",
        help="'square' squashes images to a square, 'pad' pads them with the mean colour first (default: %(default)s).",
    )
    build.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Dtype of the model; 'auto' keeps the language model's (default: %(default)s).",
    )
    build.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="config_overrides",
        help="Override a FlashSlothConfig field, VALUE in JSON (e.g. --set query_layer_index=7 --set "
        "query_hidden_size=576); repeat for several.",
    )
    build.set_defaults(handler=run_build)


def _check_hub_options(args: argparse.Namespace):
    if args.push_to_hub is None:
        given = [option for option, value in (("--revision", args.revision), ("--commit-message", args.commit_message),
                 ("--private", args.private), ("--dry-run", args.dry_run)) if value]
        if given:
            raise CliError(f"{', '.join(given)}: only used with --push-to-hub REPO")


def _model_card_context(args: argparse.Namespace) -> dict[str, str]:
    return {"repo_id": args.push_to_hub} if args.push_to_hub else {}


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise CliError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _push(args: argparse.Namespace, folder) -> None:
    from .hub import push_folder_to_hub

    files = push_folder_to_hub(
        folder,
        args.push_to_hub,
        revision=args.revision,
        commit_message=args.commit_message,
        private=args.private or None,
        dry_run=args.dry_run,
    )
    verb = "Would upload" if args.dry_run else "Uploaded"
    branch = args.revision or "main"
    print(f"{verb} {len(files)} files to {args.push_to_hub} ({branch}):")
    for name, size in files:
        print(f"  {name}  ({size:,} bytes)")


def _run(args: argparse.Namespace, make_folder) -> None:
    _check_hub_options(args)
    try:
        folder = make_folder()
        print(f"Wrote {folder}")
        if args.push_to_hub:
            _push(args, folder)
    except USER_ERRORS as error:
        raise CliError(str(error).splitlines()[0]) from error


def run_convert(args: argparse.Namespace) -> None:
    def convert():
        from .convert import convert_original_checkpoint

        return convert_original_checkpoint(
            args.source,
            args.output_dir,
            dtype=args.dtype,
            vision_config=args.vision_config,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
            allow_pickle=args.allow_pickle,
            force=args.force,
            revision=args.source_revision,
            model_card_context=_model_card_context(args),
        )

    _run(args, convert)


def run_build(args: argparse.Namespace) -> None:
    overrides = _parse_overrides(args.config_overrides)

    def build():
        import torch

        from .build import build_from_components
        from .export import check_output_dir, save_native_checkpoint

        check_output_dir(args.output_dir, args.force)  # before the (long) loading
        model, processor = build_from_components(
            args.vision,
            args.text,
            args.tokenizer,
            image_hd=args.hd,
            image_aspect_ratio=args.image_aspect_ratio,
            torch_dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            **overrides,
        )
        return save_native_checkpoint(
            model,
            processor,
            args.output_dir,
            max_shard_size=args.max_shard_size,
            force=args.force,
            model_card_context=_model_card_context(args),
        )

    _run(args, build)
