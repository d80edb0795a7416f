"""`flashsloth check-memory`: the memory-growth report over varied pipeline calls (a short run; the README gives the
figure of a 300-call run)."""

import json

import pytest

from flashsloth.cli import build_parser
from flashsloth.bench.soak import REQUEST_KINDS, main
from model_helpers import save_tiny_checkpoint
from processing_helpers import make_tiny_processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reliability") / "checkpoint"
    save_tiny_checkpoint(directory, make_tiny_processor(image_size=84, num_image_tokens_per_crop=4))
    return directory


def test_short_run_reports_every_field(checkpoint, tmp_path, capsys):
    output = tmp_path / "report.json"
    arguments = ["--model", str(checkpoint), "--calls", "20", "--warmup", "5", "--max-growth", "1000"]
    assert main(["check-memory", *arguments, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (report["calls"], report["warmup_calls"]) == (20, 5)
    assert report["requests_per_kind"] == dict.fromkeys(REQUEST_KINDS, 4)
    assert report["conversations"] > 20  # the batches hold 2 to 4 conversations each
    assert 0 < report["rss_start_mib"] <= report["rss_after_warmup_mib"] * 1.5
    growth = 100 * (report["rss_end_mib"] - report["rss_after_warmup_mib"]) / report["rss_after_warmup_mib"]
    assert report["growth_percent"] == pytest.approx(growth, abs=0.1)
    assert report["passed"] is (report["growth_percent"] <= 1000)
    assert {"seconds", "torch", "transformers", "model", "max_growth_percent"} <= set(report)


def test_growth_above_the_limit_and_bad_arguments_are_one_line_errors(checkpoint, capsys):
    arguments = ["--model", str(checkpoint), "--calls", "6", "--warmup", "3", "--max-growth", "-100"]
    assert main(["check-memory", *arguments]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("flashsloth: error: resident memory grew")
    assert main(["check-memory", "--model", str(checkpoint), "--calls", "5", "--warmup", "5"]) == 2
    assert "--warmup must lie between 0 and --calls (5)" in capsys.readouterr().err


def test_registered_as_a_flashsloth_subcommand():
    args = build_parser().parse_args(["check-memory", "--model", "folder/"])
    assert args.handler.__module__ == "flashsloth.bench.soak" and args.calls == 300 and args.max_growth == 5.0
