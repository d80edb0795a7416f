"""PyTorch FlashSloth: SigLIP -> Spatial Attention Pooling -> MLP projector -> decoder LLM with embedded queries."""

from collections.abc import Callable

import torch
from torch import nn

from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple

from .configuration_flashsloth import FlashSlothConfig
from .layout_flashsloth import (
    QueryBlockLayout,
    attention_pool,
    build_query_block_layout,
    check_image_placeholders,
    window_partition,
)
from .outputs_flashsloth import (
    CACHE_ARGUMENT,
    FlashSlothCausalLMOutputWithPast,
    FlashSlothImageFeatures,
    FlashSlothModelOutputWithPast,
    eager_attention_forward,
    float32_eager_scores,
    recorded_attention_weights,
    renamed_cache_argument,
    selected_hidden_states,
)


logger = logging.get_logger(__name__)


class FlashSlothSpatialAttentionPooling(nn.Module):
    """Spatial Attention Pooling: one token per window, the softmax-weighted sum of its patches, with the weights
    scored by a small MLP per patch. With `pooling_type="average"` (an ablation) every patch weighs the same."""

    def __init__(self, config: FlashSlothConfig):
        super().__init__()
        vision_hidden_size = config.vision_config.hidden_size
        self.grid_size = config.patch_grid_size
        self.window_size = config.pooling_window
        if config.pooling_type == "attention":
            self.fc1 = nn.Linear(vision_hidden_size, vision_hidden_size)
            self.act = nn.ReLU()
            self.dropout = nn.Dropout(config.pooling_dropout)
            self.fc2 = nn.Linear(vision_hidden_size, 1)

    def forward(self, vision_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = window_partition(vision_features, self.grid_size, self.window_size)
        if hasattr(self, "fc1"):
            scores = self.fc2(self.dropout(self.act(self.fc1(windows)))).squeeze(-1)
        else:
            scores = windows.new_zeros(windows.shape[:-1])
        return attention_pool(windows, scores)


class FlashSlothMultiModalProjector(nn.Module):
    def __init__(self, config: FlashSlothConfig):
        super().__init__()
        vision_hidden_size = config.vision_config.hidden_size
        text_hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class FlashSlothCrossAttention(nn.Module):
    """Multi-head attention of a few queries over a padded set of keys; no output projection. Values keep their own
    width, which may differ from the query/key width."""

    def __init__(self, config: FlashSlothConfig, value_size: int):
        super().__init__()
        self.config = config
        self.num_heads = config.query_num_heads
        self.head_dim = config.query_hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.query_hidden_size, config.query_hidden_size)
        self.k_proj = nn.Linear(config.query_hidden_size, config.query_hidden_size)
        self.v_proj = nn.Linear(value_size, value_size)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_blocks, num_queries, _ = queries.shape
        query_states = self.q_proj(queries).view(num_blocks, num_queries, self.num_heads, -1).transpose(1, 2)
        key_states = self.k_proj(keys).view(num_blocks, keys.shape[1], self.num_heads, -1).transpose(1, 2)
        value_states = self.v_proj(values).view(num_blocks, values.shape[1], self.num_heads, -1).transpose(1, 2)
        # (num_blocks, 1, 1, keys): 0 where visible, the dtype's minimum where padded.
        attention_mask = torch.zeros(key_mask.shape, dtype=query_states.dtype, device=query_states.device)
        attention_mask = attention_mask.masked_fill(~key_mask, torch.finfo(query_states.dtype).min)[:, None, None, :]

        # flash-attn kernels need equal query/value head sizes that are multiples of 8 (EmbQ's are 18 and 36 at full
        # size): this once-per-prefill attention over 9 queries runs on sdpa when the decoder uses flash-attn.
        implementation = self.config._attn_implementation
        if implementation is None or implementation.startswith("flash_attention"):
            implementation = "sdpa"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask, dropout=0.0, scaling=self.scaling,
            is_causal=False,
        )
        return attn_output.reshape(num_blocks, num_queries, -1), attn_weights


class FlashSlothEmbeddedQuery(nn.Module):
    """
    Embedded Query module (EmbQ, "LQFormer" in the original code). Each block of query tokens first attends to its
    instruction text, then that result attends to the un-pooled image features; the image context is projected back
    to the language model's width and added to the query hidden states.
    """

    def __init__(self, config: FlashSlothConfig):
        super().__init__()
        text_hidden_size = config.text_config.hidden_size
        vision_hidden_size = config.vision_config.hidden_size
        query_hidden_size = config.query_hidden_size
        self.text_down_proj = nn.Linear(text_hidden_size, query_hidden_size)
        self.image_down_proj = nn.Linear(vision_hidden_size, query_hidden_size)
        self.query_norm = nn.LayerNorm(query_hidden_size, eps=1e-5)
        self.text_norm = nn.LayerNorm(query_hidden_size, eps=1e-5)
        self.image_norm = nn.LayerNorm(query_hidden_size, eps=1e-5)
        self.text_attention = FlashSlothCrossAttention(config, value_size=query_hidden_size)
        self.image_attention = FlashSlothCrossAttention(config, value_size=vision_hidden_size)
        self.up_proj = nn.Linear(vision_hidden_size, text_hidden_size)

    def forward(
        self,
        query_states: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.BoolTensor,
        vision_features: torch.Tensor,
        image_mask: torch.BoolTensor,
        has_text: torch.BoolTensor,
        has_image: torch.BoolTensor,
    ) -> torch.Tensor:
        """
        query_states `(num_blocks, num_query_tokens, text_hidden)`, text_states `(num_blocks, text_length,
        text_hidden)`, vision_features `(num_blocks, image_rows, vision_hidden)` with their key masks, and per block
        whether it has any text (`has_text`) and any image (`has_image`) to read. Returns the new query states; blocks
        without an image before them are returned unchanged, blocks without instruction text read no text.
        """
        queries = self.query_norm(self.text_down_proj(query_states))
        text = self.text_norm(self.text_down_proj(text_states))
        text_context, _ = self.text_attention(queries, text, text, text_mask)
        text_context = torch.where(has_text[:, None, None], text_context, 0.0)

        image_keys = self.image_norm(self.image_down_proj(vision_features))
        image_context, _ = self.image_attention(text_context, image_keys, vision_features, image_mask)
        updated = query_states + self.up_proj(image_context)
        return torch.where(has_image[:, None, None], updated, query_states)


class FlashSlothPreTrainedModel(PreTrainedModel):
    config_class = FlashSlothConfig
    config: FlashSlothConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlashSlothEmbeddedQuery", "FlashSlothSpatialAttentionPooling"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FlashSlothModel):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.text_config.initializer_range)


class FlashSlothModel(FlashSlothPreTrainedModel):
    """The vision encoder, SAP, projector, query tokens, EmbQ and the bare decoder, without a language modeling head."""

    def __init__(self, config: FlashSlothConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        # FlashSloth reads the encoder at `vision_feature_layer` without the post-layernorm: later layers are not built.
        self.vision_tower.encoder.layers = self.vision_tower.encoder.layers[: config.num_vision_layers]
        self.vision_tower.post_layernorm = nn.Identity()
        self.spatial_pooling = FlashSlothSpatialAttentionPooling(config)
        self.multi_modal_projector = FlashSlothMultiModalProjector(config)
        self.query_tokens = nn.Parameter(torch.zeros(config.num_query_tokens, config.text_config.hidden_size))
        self.embedded_query = FlashSlothEmbeddedQuery(config) if config.use_embedded_query else None
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        image_num_crops: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FlashSlothImageFeatures:
        """
        `pixel_values` `(num_crops, channels, height, width)` -> the features of every crop and the image tokens of
        every image (`image_num_crops` crops each, a tensor or host ints, `config.num_crops` by default): see
        `FlashSlothImageFeatures`.
        `output_attentions` and `output_hidden_states` go to the vision tower.
        """
        channels, size = self.config.vision_config.num_channels, self.config.vision_config.image_size
        if tuple(pixel_values.shape[1:]) != (channels, size, size) or not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating point tensor of shape (num_crops, {channels}, {size}, {size}); got "
                f"{tuple(pixel_values.shape)} of {pixel_values.dtype}. Prepare images with the FlashSloth processor."
            )
        # Once per prefill (decoding steps carry no pixels); a compiled prefill skips this host synchronisation.
        compiling = torch.compiler.is_compiling()
        if not compiling and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError(
                "pixel_values holds NaN or infinite values. Prepare images with the FlashSloth processor, which maps "
                "pixels to [-1, 1]; check any custom preprocessing for divisions by zero."
            )
        flags = {name: kwargs[name] for name in ("output_attentions", "output_hidden_states") if name in kwargs}
        vision_outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), return_dict=True, **flags)
        vision_features = vision_outputs.last_hidden_state
        pooled, pooling_weights = self.spatial_pooling(vision_features)
        image_embeds = self.multi_modal_projector(pooled)
        image_tokens = image_embeds.flatten(0, 1)
        if image_num_crops is None or (compiling and isinstance(image_num_crops, torch.Tensor)):
            per_image = image_tokens.split(self.config.num_crops * image_embeds.shape[1])
        else:
            crops = self._image_crop_counts(image_num_crops, pixel_values.shape[0])
            per_image = image_tokens.split([count * image_embeds.shape[1] for count in crops])
        return FlashSlothImageFeatures(
            last_hidden_state=vision_features,
            pooler_output=tuple(per_image),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            pooling_weights=pooling_weights,
            image_embeds=image_embeds,
        )

    def get_query_embeddings(self) -> torch.Tensor:
        """The learned query tokens plus the input embedding of the anchor token, `(num_query_tokens, hidden_size)`."""
        anchor = torch.tensor(self.config.query_anchor_token_id, device=self.query_tokens.device)
        return self.query_tokens + self.get_input_embeddings()(anchor).to(self.query_tokens.dtype)

    def get_placeholder_ids(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.LongTensor:
        """
        `input_ids`, or for `inputs_embeds` alone, ids holding the image and query placeholder ids where an embedding
        equals their tokens' input embedding (as LLaVA's `get_placeholder_mask` finds its image tokens) and -1
        elsewhere: what the image and query insertion and the EmbQ layout read.
        """
        if input_ids is not None:
            return input_ids
        placeholder_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        for token_id in (self.config.image_token_id, self.config.query_token_id):
            token = torch.tensor(token_id, device=inputs_embeds.device)
            embedding = self.get_input_embeddings()(token).to(inputs_embeds.dtype)
            placeholder_ids = placeholder_ids.masked_fill((inputs_embeds == embedding).all(dim=-1), token_id)
        return placeholder_ids

    def insert_query_embeddings(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, query_layout: QueryBlockLayout | None = None
    ) -> torch.Tensor:
        """Replace every query placeholder by the query embedding of its rank inside its block: at the layout's query
        positions when there is a layout, else wherever `input_ids` holds a query placeholder."""
        query_embeds = self.get_query_embeddings().to(inputs_embeds.device, inputs_embeds.dtype)
        if query_layout is not None:
            batch_size, sequence_length, hidden_size = inputs_embeds.shape
            query_positions = query_layout.query_positions.to(inputs_embeds.device)
            flat_embeds = inputs_embeds.reshape(batch_size * sequence_length, hidden_size).index_copy(
                0, query_positions.flatten(), query_embeds.repeat(query_positions.shape[0], 1)
            )
            return flat_embeds.view(batch_size, sequence_length, hidden_size)
        query_token_mask = input_ids == self.config.query_token_id
        rank_in_block = (torch.cumsum(query_token_mask, dim=1) - 1).clamp(min=0) % self.config.num_query_tokens
        return torch.where(query_token_mask[..., None], query_embeds[rank_in_block], inputs_embeds)

    def insert_image_embeddings(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Write the image tokens, in order, over the image placeholders (`build_query_layout` checked their count)."""
        image_token_mask = input_ids == self.config.image_token_id
        image_embeds = image_embeds.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_token_mask[..., None], image_embeds)

    def build_query_layout(
        self,
        input_ids: torch.LongTensor,
        instruction_mask: torch.LongTensor | None,
        image_num_crops: torch.LongTensor | None,
        total_crops: int,
        check_token_ids: bool = True,
    ) -> QueryBlockLayout | None:
        """
        Check the token ids (`check_token_ids`) and image placeholders, then build the EmbQ layout of the batch (see
        `build_query_block_layout`); `None` without EmbQ or query blocks. One read-back of the ids serves both:
        `generate` calls this eagerly, ahead of a prefill that may be compiled."""
        image_num_crops = self._image_crop_counts(image_num_crops, total_crops)
        if self.embedded_query is None:
            if check_token_ids:
                self._check_token_ids(input_ids)
            num_image_tokens = int((input_ids == self.config.image_token_id).sum())
            check_image_placeholders(num_image_tokens, image_num_crops, self.config)
            return None
        device, input_ids = input_ids.device, input_ids.tolist()
        if check_token_ids:
            self._check_token_ids(input_ids)
        return build_query_block_layout(input_ids, instruction_mask, image_num_crops, self.config, device=device)

    def apply_embedded_query(
        self, hidden_states: torch.Tensor, layout: QueryBlockLayout, vision_features: torch.Tensor
    ) -> torch.Tensor:
        """Run EmbQ on every query block and write the new query states back into `hidden_states`."""
        batch_size, sequence_length, hidden_size = hidden_states.shape
        device = hidden_states.device  # with a device map, the decoder may live elsewhere than the vision tower
        flat_states = hidden_states.reshape(batch_size * sequence_length, hidden_size)
        vision_features = vision_features.reshape(-1, vision_features.shape[-1]).to(device, hidden_states.dtype)
        query_positions = layout.query_positions.to(device)
        new_query_states = self.embedded_query(
            query_states=flat_states[query_positions],
            text_states=flat_states[layout.text_positions.to(device)],
            text_mask=layout.text_mask.to(device),
            vision_features=vision_features[layout.image_rows.to(device)],
            image_mask=layout.image_mask.to(device),
            has_text=layout.has_text.to(device),
            has_image=layout.has_image.to(device),
        )
        flat_states = flat_states.index_copy(
            0, query_positions.flatten(), new_query_states.reshape(-1, hidden_size).to(flat_states.dtype)
        )
        return flat_states.view(batch_size, sequence_length, hidden_size)

    @can_return_tuple
    @renamed_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_num_crops: torch.LongTensor | None = None,
        instruction_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        query_layout: QueryBlockLayout | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FlashSlothModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_crops, 3, image_size, image_size)`, *optional*):
            All crops of all images of the batch, in text order (the processor's output).
        image_num_crops (`torch.LongTensor` of shape `(num_images,)`, *optional*):
            Crops per image; defaults to `config.num_crops` for every image.
        instruction_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            `k` on the instruction tokens read by the `k`-th query block of the sample, 0 elsewhere (the processor's
            output).
        cache (`Cache`, *optional*):
            `past_key_values` under the name transformers >= 5.25 gives it (its `generate` passes the cache so).
        query_layout (`QueryBlockLayout`, *optional*):
            The EmbQ layout of `input_ids` (`build_query_layout`), built here when not given. `generate` builds it
            ahead of the prefill, so that a compiled prefill holds none of its data-dependent shapes.
        """
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        output_attentions = kwargs.pop("output_attentions", None)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        has_images = pixel_values is not None and pixel_values.shape[0] > 0
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        language_model = self.language_model

        # A decoding step feeds one generated token, never a placeholder: it skips the id check (a host
        # synchronisation, which a compiled prefill skips too) and the query insertion.
        is_decoding_step = (input_ids if input_ids is not None else inputs_embeds).shape[1] == 1 and (
            past_key_values is not None
        )
        if inputs_embeds is None:
            # With images the layout checks the ids; `generate` builds it, and so checks them, ahead of the prefill.
            if not (is_decoding_step or has_images or torch.compiler.is_compiling()):
                self._check_token_ids(input_ids)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholder_ids = self.get_placeholder_ids(input_ids, inputs_embeds)
        if not has_images:
            query_layout = None
        elif query_layout is None:
            ids_given, crops = input_ids is not None, pixel_values.shape[0]
            query_layout = self.build_query_layout(placeholder_ids, instruction_mask, image_num_crops, crops, ids_given)
        if not is_decoding_step:
            inputs_embeds = self.insert_query_embeddings(placeholder_ids, inputs_embeds, query_layout)

        image_outputs = None
        if has_images:
            image_outputs = self.get_image_features(
                pixel_values,
                query_layout.image_num_crops if query_layout is not None else image_num_crops,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states is True,
                return_dict=True,
            )
            inputs_embeds = self.insert_image_embeddings(placeholder_ids, inputs_embeds, image_outputs.image_embeds)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARGUMENT: past_key_values},
        )
        hidden_states = inputs_embeds
        if hasattr(language_model, "embed_dropout"):
            hidden_states = language_model.embed_dropout(hidden_states)
        position_embeddings = language_model.rotary_emb(hidden_states, position_ids=position_ids)

        # Hidden state i enters decoder layer i (after EmbQ at `query_layer_index`); the last one is the normed output.
        selected, skip_embeddings = selected_hidden_states(output_hidden_states, len(language_model.layers) + 1)
        all_hidden_states = () if selected is not None else None
        attention_modules = [layer.self_attn for layer in language_model.layers if hasattr(layer, "self_attn")]
        query_modules = [self.embedded_query.text_attention, self.embedded_query.image_attention] if (
            self.embedded_query is not None
        ) else []
        with float32_eager_scores(language_model.config, hidden_states.dtype), recorded_attention_weights(
            attention_modules, output_attentions
        ) as attentions, recorded_attention_weights(query_modules, output_attentions) as query_attentions:
            for layer_index, decoder_layer in enumerate(language_model.layers):
                if layer_index == self.config.query_layer_index and query_layout is not None:
                    hidden_states = self.apply_embedded_query(hidden_states, query_layout, image_outputs.last_hidden_state)
                if selected is not None:
                    all_hidden_states += (hidden_states if layer_index in selected else None,)
                hidden_states = decoder_layer(
                    hidden_states,
                    attention_mask=causal_mask,
                    position_ids=position_ids,
                    use_cache=use_cache,
                    position_embeddings=position_embeddings,
                    **{CACHE_ARGUMENT: past_key_values},
                    **kwargs,
                )
        hidden_states = self._final_norm(hidden_states)
        if selected is not None:
            all_hidden_states += (hidden_states if len(language_model.layers) in selected else None,)
            all_hidden_states = all_hidden_states[1:] if skip_embeddings else all_hidden_states

        return FlashSlothModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=tuple(attentions) if output_attentions else None,
            image_hidden_states=image_outputs.image_embeds if image_outputs is not None else None,
            image_outputs=image_outputs,
            query_attentions=tuple(query_attentions) if len(query_attentions) == 2 else None,
            **{CACHE_ARGUMENT: past_key_values if use_cache else None},
        )

    def _check_token_ids(self, input_ids: torch.LongTensor | list[list[int]]) -> None:
        """Raise a clear error for ids (a tensor or host ids) outside the vocabulary (the embedding would fail deep
        inside torch, or with a device-side assertion that ends the CUDA context)."""
        vocab_size = self.get_input_embeddings().num_embeddings
        host_ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
        low, high = min(map(min, host_ids)), max(map(max, host_ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids holds ids in [{low}, {high}], outside the vocabulary [0, {vocab_size}). Tokenize with this "
                "checkpoint's processor; the original code's -200 image placeholder becomes the processor's image "
                "tokens."
            )

    def _final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for name in ("final_layernorm", "norm"):
            norm = getattr(self.language_model, name, None)
            if norm is not None:
                return norm(hidden_states)
        raise TypeError(f"{type(self.language_model).__name__} has no final norm named `final_layernorm` or `norm`.")

    def _image_crop_counts(self, image_num_crops: torch.LongTensor | list[int] | None, total_crops: int) -> list[int]:
        """The crops of every image as host ints (`config.num_crops` each when not given), checked against the
        `total_crops` of `pixel_values`."""
        if image_num_crops is None:
            if total_crops % self.config.num_crops:
                raise ValueError(
                    f"Got {total_crops} crops, not a multiple of config.num_crops={self.config.num_crops}; pass "
                    "image_num_crops (the processor's output) to say how many crops each image has."
                )
            return [self.config.num_crops] * (total_crops // self.config.num_crops)
        if isinstance(image_num_crops, torch.Tensor):
            crops = image_num_crops.flatten().tolist()
        else:
            crops = [int(count) for count in image_num_crops]
        if sum(crops) != total_crops:
            raise ValueError(
                f"image_num_crops adds up to {sum(crops)} crops but pixel_values holds {total_crops}. "
                "Pass the image_num_crops that the processor returned with these pixel_values."
            )
        return crops


class FlashSlothForConditionalGeneration(FlashSlothPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as native decoders: the (tied) embedding is sharded too

    def __init__(self, config: FlashSlothConfig):
        super().__init__(config)
        self.model = FlashSlothModel(config)
        text_config = config.text_config
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=config.lm_head_bias)
        self.post_init()
        if self.generation_config is not None and self.generation_config.suppress_tokens is None:
            # Placeholders are inputs only: a generated one would have no image or query behind it.
            self.generation_config.suppress_tokens = [config.image_token_id, config.query_token_id]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> FlashSlothImageFeatures:
        return self.model.get_image_features(pixel_values, **kwargs)

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
    ):
        """
        Beam search and `num_return_sequences` repeat every sample `expand_size` times. `pixel_values` and
        `image_num_crops` are per crop and per image, not per sample: repeat each sample's crops and images as one
        block (the generic expansion would interleave single crops: A, B -> A, A, B, B).
        """
        pixel_values = model_kwargs.get("pixel_values")
        if expand_size == 1 or input_ids is None or pixel_values is None or pixel_values.shape[0] == 0:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        pixel_values = model_kwargs.pop("pixel_values")
        image_num_crops = torch.tensor(
            self.model._image_crop_counts(model_kwargs.pop("image_num_crops", None), pixel_values.shape[0]),
            device=input_ids.device,
        )
        crops_per_sample = (input_ids == self.config.image_token_id).sum(dim=1) // self.config.image_tokens_per_crop
        image_sample = torch.searchsorted(crops_per_sample.cumsum(0), image_num_crops.cumsum(0))
        images_per_sample = torch.bincount(image_sample, minlength=input_ids.shape[0])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        sample_crops = pixel_values.split(crops_per_sample.tolist())
        sample_images = image_num_crops.split(images_per_sample.tolist())
        model_kwargs["pixel_values"] = torch.cat([crops for crops in sample_crops for _ in range(expand_size)])
        model_kwargs["image_num_crops"] = torch.cat([images for images in sample_images for _ in range(expand_size)])
        return input_ids, model_kwargs

    def generate(self, *args, **kwargs):
        """transformers' `generate`; with a static cache (`cache_implementation="static"`) and no `prefill_chunk_size`,
        the prompt is one prefill chunk: wherever transformers compiles the decoding step, the whole prefill runs
        through the compiled forward too (one graph per prompt shape; CUDA graphs with `mode="reduce-overhead"`)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        cache_implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        chunk_unset = kwargs.get("prefill_chunk_size", getattr(generation_config, "prefill_chunk_size", None)) is None
        if cache_implementation == "static" and chunk_unset and isinstance(input_ids, torch.Tensor):
            kwargs["prefill_chunk_size"] = input_ids.shape[1]
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """
        transformers' inputs of a generation step, plus the EmbQ layout of a step that carries images (the prefill).
        Built here, eagerly, the layout's host synchronisations happen before the device gets any work, and a
        compiled prefill (`compile_config` with `prefill_chunk_size` at least the prompt length) traces no
        data-dependent shape.
        """
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        input_ids = model_inputs.get("input_ids")
        images_dropped = model_inputs.get("pixel_values") is None and kwargs.get("pixel_values") is not None
        if input_ids is not None and images_dropped:
            # Before transformers 5.25, a chunked prefill (`prefill_chunk_size`) and an assistant model's prefill are
            # prepared as decoding steps, which drops the images. An empty cache says that this step is a prefill.
            cache = model_inputs.get(CACHE_ARGUMENT)
            if cache is None or int(cache.get_seq_length()) == 0:
                model_inputs["pixel_values"] = kwargs["pixel_values"].to(input_ids.device)
                model_inputs["image_num_crops"] = kwargs.get("image_num_crops")
        pixel_values = model_inputs.get("pixel_values")
        if input_ids is not None and pixel_values is not None and pixel_values.shape[0] > 0:
            model_inputs["query_layout"] = self.model.build_query_layout(
                input_ids, model_inputs.get("instruction_mask"), model_inputs.get("image_num_crops"), pixel_values.shape[0]
            )
        return model_inputs

    @can_return_tuple
    @renamed_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_num_crops: torch.LongTensor | None = None,
        instruction_mask: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        query_layout: QueryBlockLayout | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FlashSlothCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids for next-token prediction (shifted inside); -100 marks positions without loss.
        cache (`Cache`, *optional*):
            `past_key_values` under the name transformers >= 5.25 gives it (its `generate` passes the cache so).
        query_layout (`QueryBlockLayout`, *optional*):
            The EmbQ layout of `input_ids`, built by the model when not given (see `FlashSlothModel.forward`).

        Example:

        ```python
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> model = AutoModelForImageTextToText.from_pretrained("path/to/flashsloth", trust_remote_code=True)
        >>> processor = AutoProcessor.from_pretrained("path/to/flashsloth", trust_remote_code=True)
        >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
        >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        >>> inputs = processor(images=[image], text=prompt, return_tensors="pt")
        >>> output_ids = model.generate(**inputs, max_new_tokens=32)
        ```
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_num_crops=image_num_crops,
            instruction_mask=instruction_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            query_layout=query_layout,
            **{CACHE_ARGUMENT: cache if cache is not None else past_key_values},
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return FlashSlothCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            query_attentions=outputs.query_attentions,
            **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
        )


FlashSlothModel.register_for_auto_class("AutoModel")
FlashSlothForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "FlashSlothPreTrainedModel",
    "FlashSlothModel",
    "FlashSlothForConditionalGeneration",
    "build_query_block_layout",
    "window_partition",
    "attention_pool",
]
