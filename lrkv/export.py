"""The export folder: the interface between training and inference/evaluation.

    <dir>/config.json        every ModelConfig field (flat) + model_type / architectures / dtype (+ token ids)
    <dir>/model.safetensors  the state dict (a tied lm_head is stored once, as embed.weight)
    <dir>/tokenizer.json     HF `tokenizers` file, when one is given, with tokenizer_config.json (AutoTokenizer;
                             <|endoftext|> as eos, bos and pad) and generation_config.json (eos / pad ids)
    <dir>/modeling_lrkv.py   transformers remote code, standalone (pure torch + transformers: lrkv/config.py,
                             kernels/reference.py, model.py and hf.py in one file), named by config.json's auto_map:
                             AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) loads it anywhere

Folders are created 0755 and files 0644 (less what the umask takes), so a server running as another user reads
them. load_export also reads what transformers' save_pretrained writes from the loaded model (a Trainer or peft
result): the prefixed tensor names, the extra config keys transformers owns (unknown model keys still fail), and
sharded weights (model-0000i-of-0000n.safetensors named by model.safetensors.index.json; a missing shard is an
error naming it).

Loading needs neither Lightning nor DeepSpeed. The loader refuses a folder whose tensors do not match its
config and names the first mismatch. Writes go to a temporary sibling folder renamed into place, so an
interrupted export never leaves a half-written folder under the final name; re-exporting into an older export
moves the new files over the old ones (config.json last) and leaves every other file there (the user's) alone.

From a training checkpoint (a Lightning .ckpt file, a DeepSpeed ZeRO checkpoint folder consolidated with
DeepSpeed's zero_to_fp32, or a run folder, meaning its checkpoints/last.ckpt):

    python -m lrkv.export runs/demo runs/demo/export2 [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import functools
import ast
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """The command line; needs no heavy import, so --help answers before torch is loaded."""
    p = argparse.ArgumentParser(prog="python -m lrkv.export", description="Write an export folder (config.json, "
                                "model.safetensors, tokenizer.json) from a training checkpoint.")
    p.add_argument("src", help="a Lightning .ckpt file, a DeepSpeed checkpoint folder, or a run folder")
    p.add_argument("out", help="export folder to write (an older export's files there are replaced, other files kept)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the run folder)")
    return p


if __name__ == "__main__":  # --help and usage errors are answered here, before torch and the model code load
    parser().parse_args()

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from lrkv.atomic import DiskFullError, disk_full_message, is_disk_full  # noqa: E402
from lrkv.config import ConfigError, ModelConfig, model_config_from_dict  # noqa: E402
from lrkv.model import Transformer  # noqa: E402
from lrkv.tokenizer import EOS, TokenizerError, load_tokenizer  # noqa: E402

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"
INDEX_NAME = "model.safetensors.index.json"  # save_pretrained(max_shard_size=...): tensor name -> shard file
# every file an export may write (save_export's own plus convert_hf's extra files): re-exporting replaces these only
# (configuration_lrkv.py: older exports' remote code, removed by a re-export)
EXPORT_FILES = {CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, "tokenizer_config.json", "generation_config.json",
                "configuration_lrkv.py", "modeling_lrkv.py"}
# config.json keys that belong to transformers (PretrainedConfig's own and the names LRKVConfig mirrors), not to the
# model: ignored by name when loading, so a save_pretrained folder loads; any other unknown key is still refused
_HF_KEYS = frozenset({
    "model_type", "architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "lrkv_format",
    "_name_or_path", "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
    "tie_word_embeddings"})
AUTO_MAP = {"AutoConfig": "modeling_lrkv.LRKVConfig", "AutoModel": "modeling_lrkv.LRKVModel",
            "AutoModelForCausalLM": "modeling_lrkv.LRKVForCausalLM"}
# the remote code: these modules in this order, each one's `from lrkv...` imports resolved by the ones before
REMOTE_SOURCES = ("config.py", "kernels/reference.py", "model.py", "hf.py")
FUSED_STUB = '''
# ---- lrkv.kernels (the Triton kernels ship with the lrkv package; this file runs the reference above)
def lrkv_attend(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=True, scale=None, key_valid=None,
                impl="torch", cached=False):
    return lrkv_attention(q, k_s, v_s, z_k, z_v, b_k, b_v, cos, sin, causal=causal, scale=scale,
                          key_valid=key_valid)
'''


class ExportError(ValueError):
    """An export folder that cannot be loaded as it is; the message names the file and the first problem."""


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def config_json(cfg: ModelConfig) -> dict:
    return {"model_type": "lrkv", "architectures": ["LRKVForCausalLM"], "lrkv_format": 1, **dataclasses.asdict(cfg)}


def remote_code() -> str:
    """modeling_lrkv.py: REMOTE_SOURCES concatenated, so the export never drifts from the package that wrote it.

    Top-level `from lrkv.X import a` lines go (a is defined above by then; `import a as b` becomes `b = a`); an
    import inside a function becomes a raise. A name defined by two modules, or imported before it is defined, is
    an error here, not in a user's from_pretrained.
    """
    root = Path(__file__).resolve().parent
    parts, defined = [], set()
    for rel in REMOTE_SOURCES:
        if rel == "model.py":
            parts.append(FUSED_STUB)
            defined.add("lrkv_attend")
        source = (root / rel).read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top = set(map(id, tree.body))
        for node in sorted(ast.walk(tree), key=lambda n: -getattr(n, "lineno", 0)):  # bottom up: line numbers hold
            if not isinstance(node, ast.ImportFrom) or not (node.module == "__future__" or
                                                            (node.module or "").startswith("lrkv")):
                continue
            if id(node) not in top:
                indent = " " * node.col_offset
                new = [f"{indent}raise ImportError('{node.module} ships with the lrkv package')"]
            else:
                new = []
                for a in node.names if node.module != "__future__" else ():
                    if a.name not in defined:
                        raise RuntimeError(f"remote code: lrkv/{rel} imports {a.name} from {node.module}, "
                                           f"which no module before it in REMOTE_SOURCES defines")
                    new += [f"{a.asname} = {a.name}"] if a.asname and a.asname != a.name else []
            lines[node.lineno - 1:node.end_lineno] = new
        names = {t.id for n in tree.body for t in (ast.walk(n) if isinstance(n, (ast.Assign, ast.AnnAssign)) else ())
                 if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
        names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if names & defined:
            raise RuntimeError(f"remote code: lrkv/{rel} redefines {sorted(names & defined)}")
        defined |= names
        parts.append(f"\n# ---- lrkv/{rel}\n" + "\n".join(lines) + "\n")
    return ('"""lrkv model for transformers (trust_remote_code), standalone: generated by lrkv.export from the lrkv '
            'package\'s\nconfig.py, kernels/reference.py, model.py and hf.py. Do not edit; re-export instead."""\n'
            "from __future__ import annotations\n" + "".join(parts))


def tokenizer_config(cfg: ModelConfig) -> dict:
    """tokenizer_config.json for AutoTokenizer: the fast tokenizer over tokenizer.json; <|endoftext|>, the document
    separator in training, is eos, bos and pad (GPT-2's convention), so batched tokenising and pipelines work."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "pad_token": EOS,
            "model_max_length": cfg.max_seq_len}


def check_replaceable(out_dir: str | Path) -> None:
    """Refuse an output folder that holds something other than an lrkv export (a source checkpoint given as OUT by
    mistake, say): writing an export replaces its config.json and model files."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        is_export = "lrkv_format" in json.loads((out_dir / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        is_export = False
    if not is_export:
        raise ExportError(f"{out_dir}: exists and is not an export folder (not an lrkv export folder: no config.json "
                          f"with lrkv_format); it would be replaced, choose another")


def save_export(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                tokenizer_file: str | Path | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write an export folder (over an older export at out_dir only once the new one is complete).

    extra_files (name -> text) are written last and win over the defaults (convert_hf's tokenizer and generation
    configs); the token ids in config.json come from an extra generation_config.json (a converted model's own),
    else from our <|endoftext|>.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    files = {"modeling_lrkv.py": remote_code()}
    token_ids = {}
    if tokenizer_file is not None:
        eos = Tokenizer.from_file(str(tokenizer_file)).token_to_id(EOS)
        files["tokenizer_config.json"] = json.dumps(tokenizer_config(cfg), indent=2)
        if eos is not None:
            token_ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
            files["generation_config.json"] = json.dumps(token_ids, indent=2)
    files.update(extra_files or {})
    if "generation_config.json" in (extra_files or {}):  # e.g. SmolLM2 has <|endoftext|> but ends turns at <|im_end|>
        gen = json.loads(files["generation_config.json"])
        token_ids = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if gen.get(k) is not None}
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        # transformers' dtype="auto" loads in this dtype (it would default to float32 without it)
        dtype = next((str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()),
                     "float32")
        config = {**config_json(cfg), "dtype": dtype, **token_ids, "auto_map": AUTO_MAP}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_NAME)
        for name, text in files.items():
            (tmp / name).write_text(text)
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():  # safetensors writes 0600 and mkdtemp makes 0700
            path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out_dir.exists():
            _replace_export_files(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            need = sum(t.numel() * t.element_size() for t in state_dict.values())
            raise DiskFullError(disk_full_message(out_dir, need)) from None
        raise
    return out_dir


def _replace_export_files(new: Path, out_dir: Path) -> None:
    """Move the new export's files over the old export's, one rename each, config.json (what loaders read
    first) last. Anything else in out_dir (the user's notes, results/) stays as it is; old export files that
    this export does not write (a tokenizer.json when none is given now) are removed so they cannot mislead."""
    written = {p.name for p in new.iterdir()}
    for name in sorted(EXPORT_FILES - written):
        (out_dir / name).unlink(missing_ok=True)
    for name in sorted(written - {CONFIG_NAME}) + [CONFIG_NAME]:
        os.replace(new / name, out_dir / name)
    new.rmdir()


def load_model_config(export_dir: str | Path) -> ModelConfig:
    path = Path(export_dir) / CONFIG_NAME
    if not path.is_file():
        raise ExportError(f"{export_dir}: no {CONFIG_NAME}; not an lrkv export folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    try:
        return model_config_from_dict({k: v for k, v in data.items() if k not in _HF_KEYS})
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from e


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise ExportError naming the first missing, unexpected or mis-shaped tensor."""
    for name, t in expected.items():
        if name not in found:
            raise ExportError(f"{where}: tensor '{name}' {tuple(t.shape)} required by the config is missing")
        if tuple(found[name].shape) != tuple(t.shape):
            raise ExportError(f"{where}: tensor '{name}' has shape {tuple(found[name].shape)}, "
                              f"the config implies {tuple(t.shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ExportError(f"{where}: tensor '{extra[0]}' is not part of this config's model "
                          f"({len(extra)} unexpected tensor(s))")


def _read_safetensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file (all of them when names is None)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in (f.keys() if names is None else names)}
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: cannot read safetensors file ({e})") from e


def read_weights(export_dir: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The export's tensors and the file that lists them: model.safetensors, else the shards that
    model.safetensors.index.json maps each tensor to (what save_pretrained(max_shard_size=...) writes). The single
    file wins when both are there, as in transformers' from_pretrained."""
    export_dir = Path(export_dir)
    single, index = export_dir / WEIGHTS_NAME, export_dir / INDEX_NAME
    if single.is_file():
        return _read_safetensors(single), single
    if not index.is_file():
        raise ExportError(f"{export_dir}: no {WEIGHTS_NAME} (nor {INDEX_NAME} listing its shards)")
    shards: dict[str, list[str]] = {}
    try:
        for name, file in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(file, []).append(name)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from e
    missing = [file for file in sorted(shards) if not (export_dir / file).is_file()]
    if missing:
        raise ExportError(f"{export_dir}: shard {missing[0]} listed in {INDEX_NAME} is missing "
                          f"({len(missing)} of {len(shards)} shards missing)")
    found = {}
    for file, names in sorted(shards.items()):
        found.update(_read_safetensors(export_dir / file, names))
    return found, index


def load_export(export_dir: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, cfg: ModelConfig | None = None) -> Transformer:
    """Build the model from config.json (or `cfg`, already read from it) and load its weights (model.safetensors or
    the shards of model.safetensors.index.json) into it (eval mode)."""
    export_dir = Path(export_dir)
    cfg = load_model_config(export_dir) if cfg is None else cfg
    found, weights = read_weights(export_dir)
    if all(k.startswith("model.") for k in found):  # save_pretrained: the HF wrapper keeps Transformer as .model
        found = {k.removeprefix("model."): v for k, v in found.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(model_state_dict(model), found, str(weights))
    model.load_state_dict(found, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device, dtype=dtype).eval()


@dataclasses.dataclass(frozen=True)
class Export:
    """An export folder, read once: its model config, tokenizer and stop ids; `model()` loads the weights."""

    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]  # every id generation stops at (see open_export)

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
        return load_export(self.path, device, dtype, cfg=self.config)

    @property
    def chat_template(self) -> str | None:
        """The chat template in tokenizer_config.json (converted instruct models carry their own), or None."""
        try:
            return json.loads((self.path / "tokenizer_config.json").read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError):
            return None

    def chat_prompt(self, user: str) -> str:
        """`user` as the one user turn of the export's chat template, up to where the assistant's answer starts,
        rendered by transformers' own chat-template code (jinja2) from the export's tokenizer files."""
        if not self.chat_template:
            raise ExportError(f"{self.path}: tokenizer_config.json has no chat_template to wrap a prompt in")
        return _hf_tokenizer(self.path).apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                            add_generation_prompt=True)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: Path):
    # the fast tokenizer class itself: AutoTokenizer would follow config.json's auto_map and ask to trust remote code
    from transformers import PreTrainedTokenizerFast  # slow to import: only for chat prompts

    return PreTrainedTokenizerFast.from_pretrained(path)


def open_export(export_dir: str | Path) -> Export:
    """config.json (a bad folder fails here, before anything else is read), tokenizer.json checked against the
    config's vocabulary (converted Llama/Qwen2 exports bring their own special tokens, so our <|endoftext|> is not
    required), and the stop ids: our <|endoftext|> when the tokenizer has it plus generation_config.json's
    eos_token_id (a converted model's, e.g. Llama-3's <|eot_id|> or SmolLM2's <|im_end|>)."""
    path = Path(export_dir)
    cfg = load_model_config(path)
    tok_file = path / TOKENIZER_NAME
    if not tok_file.is_file():
        raise TokenizerError(f"{path}: no {TOKENIZER_NAME}; generation and evaluation need the export's tokenizer")
    tok = load_tokenizer(tok_file, cfg.vocab_size, require_eos=False)
    ids = set() if tok.token_to_id(EOS) is None else {tok.token_to_id(EOS)}
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ExportError(f"{gen_cfg}: not valid JSON ({e})") from e
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
    return Export(path, cfg, tok, tuple(sorted(ids)))


# ---------------------------------------------------------------------------------------------------- from training


def export_checkpoint(src: str | Path, out_dir: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write an export folder from a training checkpoint, refusing one whose tensors do not match its config."""
    # here, not at the top: checkpoint.py imports Lightning, and loading an export must not
    from lrkv.checkpoint import DamagedCheckpointError, find_tokenizer, read_checkpoint, resolve_checkpoint

    check_replaceable(out_dir)  # before reading (and consolidating) the checkpoint
    try:
        ckpt = resolve_checkpoint(src)
        tokenizer_file = Path(tokenizer_file) if tokenizer_file is not None else find_tokenizer(ckpt)
        state, meta = read_checkpoint(ckpt)
    except DamagedCheckpointError as e:
        raise ExportError(str(e)) from e
    try:
        cfg = model_config_from_dict(meta["hyper_parameters"]["config"]["model"])
    except (KeyError, TypeError) as e:
        raise ExportError(f"{ckpt}: holds no lrkv model config (hyper_parameters.config.model); "
                          f"not written by train.py") from e
    except ConfigError as e:
        raise ExportError(f"{ckpt}: {e}") from e
    # LitLM keeps the Transformer as `self.model`: its tensors are "model.<name>".
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    with torch.device("meta"):
        expected = model_state_dict(Transformer(cfg))
    check_state_dict(expected, weights, str(ckpt))
    return save_export(weights, cfg, out_dir, tokenizer_file)


def main(argv: list[str] | None = None) -> None:
    from lrkv.checkpoint import resolve_checkpoint  # see export_checkpoint

    args = parser().parse_args(argv)
    try:
        out = export_checkpoint(args.src, args.out, args.tokenizer)
    except (ExportError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"exported {resolve_checkpoint(args.src)} -> {out}")


if __name__ == "__main__":
    main()
