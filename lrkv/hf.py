"""transformers compatibility: an export folder loads with `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`, so tools built on transformers (lm-evaluation-harness's `--model hf`) run it.

This module is the single source of that remote code. `save_export` writes two short modules into every export
folder, `configuration_lrkv.py` and `modeling_lrkv.py`, which only re-export the classes below, plus `auto_map`
in config.json (and `tokenizer_config.json` beside a tokenizer.json). Loading therefore needs the `lrkv` package
installed in the Python environment (the weights and config stay plain: safetensors + flat JSON).

The wrapper holds `lrkv.model.Transformer` under `.model` (`base_model_prefix`), so transformers maps the
checkpoint's names (`embed.weight`, `layers.0...`) onto `model.embed.weight`, ... without renaming files.
`generate` (greedy or sampling) carries lrkv's own per-layer cache (`Transformer.new_cache()`, the shared k/v and
latents) as `past_key_values`, so each step feeds only the new token and, with `attn_impl: triton` on CUDA, runs
the flash-decoding kernel. Beam search would need to reorder that cache and is not supported (pass
use_cache=False to run it without a cache). Scoring (`model(ids).logits`, what lm-eval's loglikelihood calls)
builds no cache.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lrkv.config import ModelConfig, model_config_from_dict
from lrkv.model import ModelCache, Transformer
from lrkv.tokenizer import EOS

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))

AUTO_MAP = {"AutoConfig": "configuration_lrkv.LRKVConfig", "AutoModelForCausalLM": "modeling_lrkv.LRKVForCausalLM"}
REMOTE_CODE = {
    "configuration_lrkv.py": '"""Remote code for transformers: the classes live in the installed lrkv package."""\n'
                             "from lrkv.hf import LRKVConfig  # noqa: F401\n",
    "modeling_lrkv.py": '"""Remote code for transformers: the classes live in the installed lrkv package."""\n'
                        "from lrkv.hf import LRKVConfig, LRKVForCausalLM  # noqa: F401\n",
}


def tokenizer_config(cfg: ModelConfig) -> dict:
    """tokenizer_config.json for AutoTokenizer: the fast tokenizer over tokenizer.json, EOS as its special token."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": cfg.max_seq_len}


class LRKVConfig(PretrainedConfig):
    """The flat ModelConfig fields of config.json, kept in `lrkv_model`, plus the names HF tools read.

    ModelConfig fields are not set as attributes because some (rope_theta, rope_scaling) have their own
    meaning on PretrainedConfig.
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


class LRKVForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LRKVConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # applied only when tie_word_embeddings

    def __init__(self, config: LRKVConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: Transformer initialises its own parameters (and from_pretrained overwrites them)."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build an HF DynamicCache: forward makes lrkv's own ModelCache

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: ModelCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.length:]  # the cache already holds the earlier tokens
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: ModelCache | None = None,
                use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of the T new tokens input_ids, after the cached ones when past_key_values is given.

        attention_mask (B, cached + T), 0 = left padding: masked as keys (RoPE is relative, so a padded row gives
        the same logits as unpadded). use_cache=True starts a cache, returned as past_key_values.
        labels: next-token loss with HF's shift, -100 ignored.
        """
        if past_key_values is not None and not isinstance(past_key_values, ModelCache):
            raise TypeError(f"past_key_values must be lrkv's ModelCache, got {type(past_key_values).__name__}")
        cache = past_key_values if past_key_values is not None or not use_cache else self.model.new_cache()
        T = input_ids.shape[1]
        padded = attention_mask is not None and not attention_mask.all()
        logits = self.model(input_ids, cache=cache, valid=attention_mask[:, -T:].bool() if padded else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
