"""Attention maps: the weights `output_attentions=True` returns, `query_attention_map`, and `flashsloth explain`."""

import random

import numpy as np
import pytest
import torch
from model_helpers import IMAGE_SIZE, collate, make_sample, tiny_model, tiny_model_for_processor
from PIL import Image
from processing_helpers import make_tiny_processor

from flashsloth.cli import main
from flashsloth.cli_errors import EXIT_USAGE_ERROR
from flashsloth.explain import QueryAttentionMap, draw_explanation, query_attention_map
from flashsloth.training import synthetic


def scene_image(seed: int, side: int = 96) -> Image.Image:
    rng = random.Random(seed)
    return synthetic.render_scene(synthetic.sample_scene(rng), side, rng)


def cross_attention_reference(module, queries, keys, key_mask):
    """Softmax of EmbQ's scaled query-key products over the visible keys, computed here from its weights."""
    heads = module.num_heads
    query = module.q_proj(queries).unflatten(-1, (heads, -1)).transpose(1, 2)
    key = module.k_proj(keys).unflatten(-1, (heads, -1)).transpose(1, 2)
    scores = (query @ key.transpose(2, 3)) * module.scaling
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def test_output_attentions_returns_decoder_vision_and_embq_weights_on_eager():
    model = tiny_model(attn_implementation="eager")
    turns = [[(1, 1, 5, True)], [(2, 1, 4, True)]]
    batch = collate([make_sample(sample, seed=index) for index, sample in enumerate(turns)])
    captured = {}
    embq = model.model.embedded_query
    hooks = [
        getattr(embq, name).register_forward_pre_hook(lambda module, args, name=name: captured.update({name: args}))
        for name in ("text_attention", "image_attention")
    ]
    with torch.no_grad():
        outputs = model(**batch, output_attentions=True)
        plain = model(**batch)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(outputs.logits, plain.logits, rtol=0, atol=0)  # recording changes nothing

    config = model.config
    assert len(outputs.attentions) == config.text_config.num_hidden_layers
    assert len(outputs.image_outputs.attentions) == config.num_vision_layers
    sequence_length = batch["input_ids"].shape[1]
    assert outputs.attentions[0].shape == (2, config.text_config.num_attention_heads, sequence_length, sequence_length)
    real_rows = batch["attention_mask"].bool()  # left-padding rows attend to nothing
    row_sums = outputs.attentions[-1].sum(-1).permute(0, 2, 1)[real_rows]
    torch.testing.assert_close(row_sums, torch.ones(int(real_rows.sum()), 4))
    patches = config.patch_grid_size**2
    assert outputs.image_outputs.attentions[0].shape[-2:] == (patches, patches)

    text_weights, image_weights = outputs.query_attentions
    queries, keys, _, key_mask = captured["text_attention"]
    torch.testing.assert_close(text_weights, cross_attention_reference(embq.text_attention, queries, keys, key_mask))
    queries, keys, _, key_mask = captured["image_attention"]
    torch.testing.assert_close(image_weights, cross_attention_reference(embq.image_attention, queries, keys, key_mask))
    assert image_weights.shape[:3] == (2, config.query_num_heads, config.num_query_tokens)  # one block per sample


def test_sdpa_returns_no_attention_weights_and_float16_eager_keeps_its_name():
    batch = collate([make_sample([(1, 1, 5, True)])])
    with torch.no_grad():
        outputs = tiny_model(attn_implementation="sdpa")(**batch, output_attentions=True)
        assert outputs.attentions == () and outputs.query_attentions is None
        half = tiny_model(attn_implementation="eager").half()
        outputs = half(**batch, output_attentions=True)
    assert all(torch.isfinite(weights).all() for weights in outputs.attentions)
    assert half.model.language_model.config._attn_implementation == "eager"


@pytest.fixture(scope="module")
def tiny_pair():
    processor = make_tiny_processor(image_size=IMAGE_SIZE, num_image_tokens_per_crop=4)
    return tiny_model_for_processor(processor, seed=2), processor


def test_query_attention_map_is_embqs_attention_over_the_patch_grid(tiny_pair):
    model, processor = tiny_pair
    image = scene_image(1)
    attention = query_attention_map(model, processor, image, "What color is the square?")
    grid = model.config.patch_grid_size
    assert isinstance(attention, QueryAttentionMap) and attention.per_query.shape == (9, grid, grid)
    # One crop: every query token's weights over the image are all on this grid.
    torch.testing.assert_close(attention.per_query.sum(dim=(1, 2)), torch.ones(9))
    torch.testing.assert_close(attention.heat, attention.per_query.mean(dim=0))
    assert "".join(attention.instruction_tokens) == "What color is the square?"
    torch.testing.assert_close(attention.instruction_weights.sum(dim=1), torch.ones(9))
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the call, and back

    model.set_attn_implementation("eager")
    eager = query_attention_map(model, processor, image, "What color is the square?")
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager.per_query, attention.per_query)


def test_hd_map_covers_the_whole_image_crop_only(tiny_pair):
    model, processor = tiny_pair
    attention = query_attention_map(model, processor, scene_image(2), "Where is the circle?", image_hd=True)
    totals = attention.per_query.sum(dim=(1, 2))
    assert ((totals > 0) & (totals < 1)).all()  # the rest went to the four HD tiles


def test_picture_puts_the_heat_where_the_map_is_hot():
    image = Image.new("RGB", (90, 60), (128, 128, 128))
    heat = torch.zeros(3, 3)
    heat[0, 2] = 1.0  # top right
    attention = QueryAttentionMap(heat[None], heat, ["a"], torch.ones(1, 1), image.size, padded=False)
    picture = np.asarray(draw_explanation(image, attention, "q?", "a"), dtype=np.int16)
    assert picture.shape[1] == 2 * 576 + 12  # 90x60 enlarged to 576x384, side by side
    header = picture.shape[0] - 384 - 4
    left = picture[header : header + 384, 4 : 4 + 576]
    right = picture[header : header + 384, 584 : 584 + 576]
    assert (left == 128).all()
    change = np.abs(right - left).sum(axis=-1)
    assert change[:64, -96:].mean() > 5 * change[-64:, :96].mean()


def test_explain_command_on_the_demo_model(tmp_path, capsys):
    image_path, output = tmp_path / "scene.png", tmp_path / "heat.png"
    scene_image(3, side=144).save(image_path)
    args = ["explain", str(image_path), "--question", "What color is the triangle?", "--output", str(output)]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {output}" in printed and "answer:" in printed and "instruction tokens" in printed
    with Image.open(output) as picture:
        assert picture.width == 2 * 384 + 12 and picture.height > 384


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--output", "heat.jpg"], "must name a .png"), (["--output", "h.png", "--question", " "], "--question is empty")],
)
def test_explain_command_rejects_bad_options(tmp_path, capsys, extra, message):
    image_path = tmp_path / "scene.png"
    scene_image(4).save(image_path)
    assert main(["explain", str(image_path), "--question", "What?", *extra]) == EXIT_USAGE_ERROR
    assert message in capsys.readouterr().err
