"""LLaVA data for training: conversion to chat messages, the dataset, and the collator's prompts and labels."""

import json

import pytest
import torch
from training_helpers import colour_image, llava_records, tiny_processor, tiny_training_model, write_llava_json

from flashsloth.training.data import IGNORE_INDEX, FlashSlothDataCollator, LlavaDataset, llava_to_messages


SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def test_llava_to_messages_moves_image_markers_to_the_start_of_their_turn():
    conversations = [
        {"from": "human", "value": "What colour is it?\n<image>"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ]
    assert llava_to_messages(conversations, has_image=True) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]


def test_llava_to_messages_without_marker_and_without_image():
    conversations = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A cat."}]
    with_image = llava_to_messages(conversations, has_image=True)
    assert with_image[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe it."}]
    text_only = llava_to_messages(conversations, has_image=False)
    assert text_only[0]["content"] == [{"type": "text", "text": "Describe it."}]
    two_images = llava_to_messages(
        [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}], True, num_images=2
    )
    assert [item["type"] for item in two_images[0]["content"]] == ["image", "image", "text"]


@pytest.mark.parametrize(
    "conversations, has_image, message",
    [
        ([], False, "empty"),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "a"}], False, "unknown speaker"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], False, "alternate"),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}],
            False,
            "ends with a human",
        ),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], False, "marker"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}], True, "answer with"),
        ([{"from": "human", "value": "q"}], False, "ends with a human"),
        ([{"value": "q"}], False, "'from' and 'value'"),
    ],
)
def test_llava_to_messages_rejects_malformed_conversations(conversations, has_image, message):
    with pytest.raises(ValueError, match=message):
        llava_to_messages(conversations, has_image=has_image)


def test_dataset_reads_json_and_opens_images_lazily(tmp_path):
    json_path = write_llava_json(tmp_path, num_samples=4)
    dataset = LlavaDataset(json_path, tmp_path / "images")
    assert len(dataset) == 4
    item = dataset[0]
    assert item["id"] == "sample-0"
    assert len(item["images"]) == 1 and item["images"][0].mode == "RGB" and item["images"][0].size == (32, 32)
    assert item["messages"][0]["content"][0] == {"type": "image"}
    text_only = dataset[3]
    assert text_only["images"] == [] and text_only["id"] == "text-3"
    # Length estimate: words plus 90 per image, so image samples sort after text-only ones of similar text.
    assert dataset.lengths[0] == len("What is the color?".split()) + 1 + 90
    assert dataset.lengths[3] == len("Say the name of a colour.".split()) + 1

    (tmp_path / "images" / "image-1.png").unlink()
    with pytest.raises(FileNotFoundError, match="image-1.png"):
        dataset[1]


def test_dataset_rejects_bad_files_and_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LlavaDataset(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlavaDataset(broken)
    bad_record = tmp_path / "bad.json"
    bad_record.write_text(json.dumps([{"id": "x1", "conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match="id 'x1'"):
        LlavaDataset(bad_record)
    with pytest.raises(ValueError, match="relative"):
        LlavaDataset(
            [{"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
        )[0]


def expected_prompt(turns, has_image):
    """The training prompt written by hand from the phi2 conversation format (DESIGN.md section 2.9)."""
    text = SYSTEM + " "
    for index, (question, answer) in enumerate(turns):
        image = "<image>\n" if has_image and index == 0 else ""
        query = "<learnable>" if has_image else ""
        text += f"USER: {image}{question}{query} ASSISTANT: {answer}</s>"
    return text


def labelled_runs(labels):
    """The contiguous runs of labelled token ids of one row."""
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs + ([current] if current else [])


def test_collator_builds_the_training_prompt_and_labels_only_the_answers(processor):
    records = [
        {
            "id": "two-turns",
            "image": colour_image("blue"),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the color?"},
                {"from": "gpt", "value": "It is blue."},
                {"from": "human", "value": "How many cats are there?"},
                {"from": "gpt", "value": "There are two cats."},
            ],
        },
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Say a word."}, {"from": "gpt", "value": "stop"}],
        },
    ]
    dataset = LlavaDataset(records)
    batch = FlashSlothDataCollator(processor)([dataset[0], dataset[1]])
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "instruction_mask",
        "pixel_values",
        "image_num_crops",
    }

    tokenizer = processor.tokenizer
    cases = [
        (0, [("What is the color?", "It is blue."), ("How many cats are there?", "There are two cats.")], True),
        (1, [("Say a word.", "stop")], False),
    ]
    for row, turns, has_image in cases:
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        reference = processor(
            images=[dataset[row]["images"]] if has_image else None,
            text=expected_prompt(turns, has_image),
            return_tensors="pt",
        )
        assert batch["input_ids"][row, :length].tolist() == reference["input_ids"][0].tolist()
        assert batch["instruction_mask"][row, :length].tolist() == reference["instruction_mask"][0].tolist()
        # One query block per user turn when the sample has an image, none otherwise.
        query_tokens = int((batch["input_ids"][row] == processor.query_token_id).sum())
        assert query_tokens == (processor.num_query_tokens * len(turns) if has_image else 0)
        assert int(batch["instruction_mask"][row].max()) == (len(turns) if has_image else 0)
        # Labels: the answers and their </s>, nothing else (padding, prompt, image and query tokens are -100).
        labels = batch["labels"][row]
        assert (labels[length:] == IGNORE_INDEX).all()
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], batch["input_ids"][row][labelled])
        runs = [tokenizer.decode(run).strip() for run in labelled_runs(labels)]
        assert runs == [f"{answer}</s>" for _, answer in turns]

    assert torch.equal(
        batch["pixel_values"], processor.image_processor([colour_image("blue")], return_tensors="pt")["pixel_values"]
    )
    assert batch["image_num_crops"].tolist() == [1]


def test_collator_rows_match_single_sample_batches(processor):
    dataset = LlavaDataset(llava_records(6))
    collator = FlashSlothDataCollator(processor)
    batch = collator([dataset[index] for index in range(6)])
    crop = 0
    for index in range(6):
        single = collator([dataset[index]])
        length = single["input_ids"].shape[1]
        for key in ("input_ids", "labels", "instruction_mask", "attention_mask"):
            assert torch.equal(batch[key][index, :length], single[key][0]), key
        if "pixel_values" in single:
            crops = single["pixel_values"].shape[0]
            assert torch.equal(batch["pixel_values"][crop : crop + crops], single["pixel_values"])
            crop += crops
    assert crop == batch["pixel_values"].shape[0]
    text_only_batch = collator([dataset[3]])
    assert "pixel_values" not in text_only_batch


def test_collator_rejects_too_long_samples_naming_them(processor):
    dataset = LlavaDataset(llava_records(2))
    with pytest.raises(ValueError, match=r"sample-0.*max_length"):
        FlashSlothDataCollator(processor, max_length=20)([dataset[0], dataset[1]])


def test_model_loss_on_a_collated_batch_is_the_answer_token_cross_entropy(processor):
    dataset = LlavaDataset(llava_records(4))
    batch = FlashSlothDataCollator(processor)([dataset[index] for index in range(4)])
    model = tiny_training_model(processor)
    with torch.no_grad():
        output = model(**batch)
    # Reference: next-token cross-entropy over the labelled positions only.
    logits = output.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX])
    torch.testing.assert_close(output.loss, reference)
