"""
transformers' own common model tests (`ModelTesterMixin` and `ConfigTester` from the installed version's
`tests/test_modeling_common.py`, see tests/common_helpers.py) on a tiny FlashSloth, with a model tester written the
way transformers writes a vision-language model's (LLaVA's). The skips are listed and explained in docs/conformance.md.
"""

import unittest
import warnings
from unittest import mock

import pytest
import torch
import transformers
from common_helpers import CommonTestsUnavailable, load_common_tests
from transformers.models.auto import modeling_auto

from flashsloth import FlashSlothConfig, FlashSlothForConditionalGeneration, FlashSlothModel

pytest.importorskip(
    "parameterized",
    reason="transformers' common tests need `parameterized` (in the `test` extra: pip install -e '.[test]')",
)
try:
    with warnings.catch_warnings():  # transformers' own pytest marks (flash_attn_test, ...) are unknown here
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        test_modeling_common, test_configuration_common = load_common_tests()
except CommonTestsUnavailable as error:
    pytest.skip(
        f"transformers {transformers.__version__}'s common tests cannot be had: {error}. They are fetched once from "
        "its sdist and cached (see tests/common_helpers.py).",
        allow_module_level=True,
    )
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
floats_tensor = test_modeling_common.floats_tensor
ids_tensor = test_modeling_common.ids_tensor


class FlashSlothModelTester:
    """A tiny FlashSloth: 6x6 patches pooled to 4 image tokens per image, a 3-token query block injected before the
    second of 2 decoder layers. Each sample is `[image x4] [newline] [instruction x4] [query x3] [answer x3]`."""

    def __init__(
        self,
        parent,
        batch_size=3,
        image_token_id=1,
        query_token_id=2,
        query_anchor_token_id=3,
        num_query_tokens=3,
        vision_feature_layer=-1,
        text_config={
            "model_type": "phi",
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "hidden_act": "gelu_new",
            "max_position_embeddings": 512,
            "partial_rotary_factor": 0.5,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "image_size": 12,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        },
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_token_id = image_token_id
        self.query_token_id = query_token_id
        self.query_anchor_token_id = query_anchor_token_id
        self.num_query_tokens = num_query_tokens
        self.vision_feature_layer = vision_feature_layer
        self.text_config = text_config
        self.vision_config = vision_config
        self.is_training = is_training
        self.pad_token_id = text_config["pad_token_id"]

        self.num_hidden_layers = text_config["num_hidden_layers"]
        self.vocab_size = text_config["vocab_size"]
        self.hidden_size = text_config["hidden_size"]
        self.num_attention_heads = text_config["num_attention_heads"]
        self.num_channels = vision_config["num_channels"]
        self.image_size = vision_config["image_size"]
        self.num_image_tokens = (self.image_size // vision_config["patch_size"] // 3) ** 2
        self.seq_length = self.num_image_tokens + 1 + 4 + num_query_tokens + 3
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return FlashSlothConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            vision_feature_layer=self.vision_feature_layer,
            pooling_window=3,
            num_query_tokens=self.num_query_tokens,
            query_layer_index=1,
            query_hidden_size=16,
            image_token_id=self.image_token_id,
            query_token_id=self.query_token_id,
            query_anchor_token_id=self.query_anchor_token_id,
            pooling_dropout=0.0,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        # Text ids avoid the placeholders (1, 2) and the anchor (3).
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        query_start = self.num_image_tokens + 1 + 4
        input_ids[:, query_start : query_start + self.num_query_tokens] = self.query_token_id
        inputs_dict = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        return config, inputs_dict


class FlashSlothModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (FlashSlothModel, FlashSlothForConditionalGeneration)
    _is_composite = True

    def setUp(self):
        # transformers lists its native models in the Auto tables, which the mixin reads to tell a base model from
        # one with a head (for the training tests, the labels, and the `inputs_embeds` and image-feature checks).
        for table, name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "FlashSlothModel"),
            (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "FlashSlothForConditionalGeneration"),
        ):
            patcher = mock.patch.dict(table, {"flashsloth": name})
            patcher.start()
            self.addCleanup(patcher.stop)
        patcher = mock.patch.dict(modeling_auto.MODEL_MAPPING._extra_content, {FlashSlothConfig: FlashSlothModel})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.model_tester = FlashSlothModelTester(self)
        self.config_tester = ConfigTester(self, config_class=FlashSlothConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(
        reason="transformers' GenerationTesterMixin lives in tests/generation/ of its repository, which the sdist does "
        "not ship; FlashSloth's generation is tested by tests/test_generation.py and tests/test_parity.py (see "
        "docs/conformance.md)"
    )
    def test_generation_tester_mixin_inheritance(self):
        pass
