"""transformers classes for an lrkv export: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
(or `AutoModel`, the body without the head), so tools built on transformers (lm-evaluation-harness's `--model hf`,
the Trainer, peft) run it.

This module is also the export's remote code: `lrkv.export` writes it, after lrkv/config.py,
lrkv/kernels/reference.py and lrkv/model.py, as one standalone `modeling_lrkv.py` (pure torch + transformers), so an
export loads where the `lrkv` package is not installed.

- The wrapper holds `lrkv.model.Transformer` under `.model` (`base_model_prefix`), so transformers maps the export's
  names (`embed.weight`, `layers.0...`) onto `model.embed.weight`, ... without renaming files.
- `generate` keeps lrkv's own per-layer cache (`ModelCache`: the shared k/v and latents, never per-head K/V) inside
  `LRKVCache`, a transformers `Cache`: generate starts it and carries it (called `past_key_values` up to
  transformers 5.23, `cache` from 5.24; both accepted), each step after the prompt feeds only the new token, beam
  search reorders it and assisted decoding crops it. Loaded from this package (not the export's copy) with
  `attn_impl: triton` on CUDA, decode steps run the flash-decoding kernel.
- Training through transformers: labels (HF's loss, `num_items_in_batch` included), `inputs_embeds`,
  `output_hidden_states`, gradient checkpointing, `resize_token_embeddings`. Attention is always scaled-dot-product
  (PyTorch SDPA or the fused kernel): `attn_implementation="sdpa"` is what runs; `output_attentions` is refused
  because the weights are never formed.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from lrkv.config import ModelConfig, model_config_from_dict
from lrkv.model import KVCache, ModelCache, Transformer

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# the model outputs' cache field: `past_key_values` up to transformers 5.23, `cache` from 5.24
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LRKVConfig(PretrainedConfig):
    """The ModelConfig fields, flat in config.json as in an export, plus the names HF tools read.

    They are kept in `lrkv_model` rather than set as attributes because some (rope_theta, rope_scaling) have their
    own meaning on PretrainedConfig; `to_dict` writes them flat again, so save_pretrained writes an export's layout.
    """

    model_type = "lrkv"

    def __init__(self, lrkv_model: dict | None = None, **kwargs):
        model = dict(lrkv_model or {})
        model.update({name: kwargs.pop(name) for name in _FIELDS if name in kwargs})
        cfg = model_config_from_dict(model)
        self.lrkv_model = dataclasses.asdict(cfg)
        kwargs["tie_word_embeddings"] = cfg.tie_embeddings
        kwargs.setdefault("architectures", ["LRKVForCausalLM"])
        super().__init__(**kwargs)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layer
        self.num_attention_heads = cfg.n_head
        self.max_position_embeddings = cfg.max_seq_len  # lm-eval's max_length

    @property
    def model_config(self) -> ModelConfig:
        return model_config_from_dict(self.lrkv_model)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(out.pop("lrkv_model"))
        return out


class LRKVCache(Cache):
    """lrkv's ModelCache behind transformers' Cache interface: the per-layer tensors stay lrkv's own layout."""

    is_compileable = False  # it grows by doubling; a static, compilable layout would be another cache

    def __init__(self, n_layer: int):
        super().__init__(layers=[])
        self.lrkv = ModelCache(n_layer)

    def _kv_caches(self) -> list[KVCache]:
        return [*self.lrkv.layers, self.lrkv.valid]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lrkv.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the cache becomes row beam_idx[i]."""
        for c in self._kv_caches():
            c.select_rows(beam_idx)

    def crop(self, n: int) -> None:
        """Assisted decoding drops rejected candidates: n > 0 keeps the first n tokens (transformers < 5.24),
        n <= 0 drops the last -n (both)."""
        keep = n if n > 0 else self.lrkv.length + n
        for c in self._kv_caches():
            c.truncate(keep)


class LRKVPreTrainedModel(PreTrainedModel):
    config_class = LRKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # attention is F.scaled_dot_product_attention (or the fused kernel) in every variant

    def __init__(self, config: LRKVConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable(), with the function to use
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: Transformer initialises its own parameters (and from_pretrained overwrites them)."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def resize_token_embeddings(self, *args, **kwargs) -> torch.nn.Embedding:
        embed = super().resize_token_embeddings(*args, **kwargs)
        n = embed.weight.shape[0]
        self.config.lrkv_model["vocab_size"] = n  # what config.json (to_dict) writes
        self.model.cfg = dataclasses.replace(self.model.cfg, vocab_size=n)
        return embed

    def body(self, input_ids, inputs_embeds, attention_mask, cache: LRKVCache | None, output_hidden_states: bool):
        """Transformer.forward up to the final norm, with HF's extras (embeddings in, hidden states out,
        transformers' checkpointing function); tests keep it equal to Transformer.forward."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        m = self.model
        x = m.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        start = cache.lrkv.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=x.device)
        # attention_mask (B, cached + T), 0 = padding: masked as keys (RoPE is relative, so a left-padded row gives
        # the same logits as unpadded); generate's position_ids are therefore not needed
        valid = attention_mask[:, -T:].bool() if attention_mask is not None and not attention_mask.all() else None
        key_valid = cache.lrkv.key_valid(valid, B, T, x.device) if cache is not None else valid
        hidden = []
        for i, layer in enumerate(m.layers):
            hidden.append(x)
            layer_cache = cache.lrkv.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer, x, positions, layer_cache, key_valid)
            else:
                x = layer(x, positions, layer_cache, key_valid)
        x = m.norm(x)
        return x, ((*hidden, x) if output_hidden_states else None)

    def _cache(self, cache, past_key_values, use_cache) -> LRKVCache | None:
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LRKVCache):
            raise TypeError(f"the cache must be lrkv.hf.LRKVCache (lrkv's own layout), got {type(cache).__name__}; "
                            f"leave it to generate or pass use_cache=True")
        return cache if cache is not None or not use_cache else LRKVCache(self.config.num_hidden_layers)

    @staticmethod
    def _refuse(output_attentions) -> None:
        if output_attentions:
            raise ValueError("output_attentions: lrkv attention runs fused (SDPA or the Triton kernel) and never forms "
                             "the attention weights")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build an HF DynamicCache ...

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """... it starts an LRKVCache instead (unless given one, or use_cache=False), so it owns the cache from the
        first step (assisted decoding requires that)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(_CACHE_FIELD) is None:
            model_kwargs[_CACHE_FIELD] = LRKVCache(self.config.num_hidden_layers)


class LRKVModel(LRKVPreTrainedModel):
    """AutoModel: the final-norm hidden states (B, T, d_model)."""

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, use_cache=None,
                inputs_embeds=None, output_hidden_states=None, output_attentions=None, **kwargs):
        self._refuse(output_attentions)
        cache = self._cache(cache, past_key_values, use_cache)
        x, hidden = self.body(input_ids, inputs_embeds, attention_mask, cache, bool(output_hidden_states))
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden, **{_CACHE_FIELD: cache})


class LRKVForCausalLM(LRKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # applied only when tie_word_embeddings

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, cache=None, past_key_values=None,
                use_cache=None, inputs_embeds=None, output_hidden_states=None, output_attentions=None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of the T new tokens, after the cached ones when a cache is given.

        use_cache=True starts a cache, returned in the output. labels: next-token loss with HF's shift, -100
        ignored. Other generate/Trainer kwargs (position_ids, cache_position, num_items_in_batch) are accepted.
        """
        self._refuse(output_attentions)
        cache = self._cache(cache, past_key_values, use_cache)
        x, hidden = self.body(input_ids, inputs_embeds, attention_mask, cache, bool(output_hidden_states))
        logits = self.model.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden, **{_CACHE_FIELD: cache})
