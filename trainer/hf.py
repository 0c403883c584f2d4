"""Hugging Face Llama checkpoints <-> trainer.model.Transformer.

trainer/model.py uses Llama's architecture and Hugging Face's rotate-half RoPE layout, so the weight mapping is a
pure rename (no permutation of q/k rows):

    tok_embeddings                          <-> model.embed_tokens
    layers.i.attention.{wq,wk,wv,wo}        <-> model.layers.i.self_attn.{q,k,v,o}_proj
    layers.i.attention_norm                 <-> model.layers.i.input_layernorm
    layers.i.feed_forward.{w1,w2,w3}        <-> model.layers.i.mlp.{gate,down,up}_proj
    layers.i.ffn_norm                       <-> model.layers.i.post_attention_layernorm
    norm / output                           <-> model.norm / lm_head

`save_hf` writes a folder that `transformers` (LlamaForCausalLM, LlamaTokenizer) and vLLM load as is:
config.json (with our own record under "jpeglm": byte offset, tokenizer fingerprint, codec),
generation_config.json, model.safetensors (or shards + model.safetensors.index.json), tokenizer.model,
tokenizer_config.json, special_tokens_map.json. `load_hf` reads such a folder (ours, or
another Llama checkpoint such as the authors' released JPEG-LM weights) from a local path or s3://.

`transformers` itself is never imported here (it is a test-only dependency); config.json and the safetensors
names are written by this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch

from pipeline.tokenizer import BYTE_OFFSET  # byte b of a JPEG is chr(BYTE_OFFSET + b) in the tokenizer's text
from trainer.model import ModelConfig, Transformer
from trainer.pretrained import with_codec_defaults

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_LAYER_RENAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_RENAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
# Buffers some older Llama checkpoints carry; recomputed from rope_theta, so safe to drop.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------- names and configs


def to_hf_name(name: str) -> str:
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and base in _TOP_RENAMES:
        return f"{_TOP_RENAMES[base]}.weight"
    raise KeyError(f"no Hugging Face Llama name for parameter {name!r}")


def from_hf_name(name: str) -> str:
    m = _HF_LAYER_RE.match(name)
    if m:
        for ours, theirs in _LAYER_RENAMES.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}.weight"
    for ours, theirs in _TOP_RENAMES.items():
        if name == f"{theirs}.weight":
            return f"{ours}.weight"
    raise KeyError(f"unexpected tensor {name!r} in a Llama checkpoint")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state_dict.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    out = {from_hf_name(k): v for k, v in hf_state.items() if not _HF_IGNORED_RE.search(k)}
    if tie_word_embeddings and "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config(
    cfg: ModelConfig,
    bos_id: int | None = 1,
    eos_id: int | None = 2,
    pad_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
) -> dict:
    """config.json of LlamaForCausalLM for `cfg` (keys read by transformers 4.x/5.x and vLLM)."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # Top-level rope_theta + rope_scaling null is the Llama-2 layout every loader understands
        # (transformers 5 moves it into rope_parameters itself).
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if extra:
        d.update(extra)
    return d


def model_config_from_hf(d: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Llama config.json; refuses what trainer/model.py cannot represent."""
    arch = d.get("architectures") or []
    if d.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"not a Llama checkpoint: model_type={d.get('model_type')!r}, architectures={arch}")
    problems = []
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (only silu/SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            problems.append(f"{key}=true (the model has no biases)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (only plain RoPE)")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    if d.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim={d['head_dim']} != hidden_size/num_attention_heads={hidden // heads}")
    if problems:
        raise ValueError("unsupported Llama config: " + "; ".join(problems))
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    cfg = dict(
        vocab_size=d["vocab_size"],
        n_layers=d["num_hidden_layers"],
        d_model=hidden,
        n_heads=heads,
        n_kv_heads=d.get("num_key_value_heads") or heads,
        ffn_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 12288),
        rope_theta=float(theta),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        init_std=float(d.get("initializer_range", 0.02)),
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


# ---------------------------------------------------------------------------------------------- save


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _special_pieces(tokenizer_path: str) -> dict[str, str | None]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    return {
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
        "ids": {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()},
    }


def save_hf(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str,
    tokenizer_path: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_meta: dict | None = None,
    codec: dict | None = None,
) -> list[str]:
    """Write a Hugging Face Llama checkpoint of our model's `state_dict` into the local folder `out_dir`.

    dtype: store the weights in this dtype (default: as given). The tokenizer's BOS/EOS ids go into config.json,
    so `generate()` starts and stops where the model was trained to. codec: the training data's codec record
    (image size, quality; trainer.pretrained.with_codec_defaults), kept in config.json under "jpeglm". Returns the
    written file names.
    """
    from safetensors.torch import save_file

    if tokenizer_path is None:
        log.warning("save_hf: no tokenizer_path; the folder will hold weights and config only")
    os.makedirs(out_dir, exist_ok=True)
    hf_state = {}
    for k, v in to_hf_state_dict(state_dict).items():
        t = v.detach().to("cpu")
        hf_state[k] = (t.to(dtype) if dtype is not None else t).contiguous()
    missing = {to_hf_name(n) for n in _expected_names(cfg)} - set(hf_state)
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    stored_dtype = next(iter(hf_state.values())).dtype

    written = []
    shards = _shard(hf_state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        written.append("model.safetensors")
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            written.append(name)
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append("model.safetensors.index.json")

    bos, eos, pad = 1, 2, None
    extra = {"jpeglm": {"byte_offset": BYTE_OFFSET, "tokenizer": tokenizer_meta or {},
                        "codec": with_codec_defaults(codec)}}
    if tokenizer_path:
        special = _special_pieces(tokenizer_path)
        bos, eos = special["ids"]["bos"], special["ids"]["eos"]
        pad = special["ids"]["pad"] if special["ids"]["pad"] >= 0 else None
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
        tokens = {k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special[k] is not None}
        _write_json(
            os.path.join(out_dir, "tokenizer_config.json"),
            {
                "tokenizer_class": "LlamaTokenizer",
                **tokens,
                "add_bos_token": True,
                "add_eos_token": False,
                # The text is one Braille character per byte with no spaces: no dummy prefix, no cleanup.
                "add_prefix_space": False,
                "legacy": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": cfg.max_seq_len,
                "sp_model_kwargs": {},
            },
        )
        _write_json(os.path.join(out_dir, "special_tokens_map.json"), tokens)
        written += ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    _write_json(os.path.join(out_dir, "config.json"), hf_config(cfg, bos, eos, pad, stored_dtype, extra))
    # The authors' sampling defaults, so a plain model.generate() samples like `jpeglm sample`.
    _write_json(
        os.path.join(out_dir, "generation_config.json"),
        {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad if pad is not None else eos, "do_sample": True,
         "temperature": 1.0, "top_k": 50, "top_p": 0.9, "max_length": cfg.max_seq_len},
    )
    written += ["config.json", "generation_config.json"]
    log.info("wrote Hugging Face Llama checkpoint to %s (%d shard(s), %s)", out_dir, len(shards), stored_dtype)
    return written


def _expected_names(cfg: ModelConfig) -> list[str]:
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(cfg.n_layers):
        names += [f"layers.{i}.{n}.weight" for n in _LAYER_RENAMES]
    return names


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------------------------------------- load


def is_llama_config(d: dict) -> bool:
    """Whether a config.json is a Hugging Face Llama model's (our own exported format has "format": "jpeglm")."""
    llama = d.get("model_type") == "llama" or "LlamaForCausalLM" in (d.get("architectures") or [])
    return llama and d.get("format") != "jpeglm"


def is_hf_dir(path: str) -> bool:
    """A local folder with a Llama config.json and weights."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    with open(cfg_path) as f:
        if not is_llama_config(json.load(f)):
            return False
    return any(os.path.isfile(os.path.join(path, n)) for n in _WEIGHT_FILES)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _weight_files(path: str) -> list[str]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    raise ValueError(f"{path}: no weights (expected one of {', '.join(_WEIGHT_FILES)})")


def _read_tensors(file: str, device: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file, device=device)
    # weights_only: a .bin is a pickle; never execute code from a downloaded checkpoint.
    return torch.load(file, map_location=device, weights_only=True)


def load_hf_local(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, dict]:
    """(model in eval mode, info) from a local Hugging Face Llama folder. info: {"config": config.json,
    "tokenizer_path": path or None, "bos_id", "eos_id", "model_config": ModelConfig, "codec": the image size and
    quality it was trained on (config.json's "jpeglm" record; 256 / 25 when absent, e.g. the authors' weights)}."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    cfg = model_config_from_hf(d)
    with torch.device("meta"):
        model = Transformer(cfg)
    hf_state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        for k, t in _read_tensors(file, str(device)).items():
            hf_state[k] = t.to(dtype) if dtype is not None else t
    state = from_hf_state_dict(hf_state, tie_word_embeddings=bool(d.get("tie_word_embeddings")))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    for k, t in state.items():
        want = tuple(model.state_dict()[k].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, config says {want}")
    model.load_state_dict(state, strict=True, assign=True)
    tokenizer = os.path.join(path, "tokenizer.model")
    info = {
        "config": d,
        "model_config": cfg,
        "tokenizer_path": tokenizer if os.path.isfile(tokenizer) else None,
        "bos_id": d.get("bos_token_id"),
        "eos_id": d.get("eos_token_id"),
        "codec": with_codec_defaults((d.get("jpeglm") or {}).get("codec")),
    }
    return model.to(device).eval(), info


def load_hf(uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, dict]:
    """Like load_hf_local, for a local folder or an s3:// prefix (copied to a temporary folder first). For s3://,
    info["tokenizer_path"] is the tokenizer's s3:// URI (pipeline.tokenizer.Tokenizer.load reads it)."""
    from pipeline import storage

    with storage.local_folder(uri) as path:
        if not is_hf_dir(path):
            raise ValueError(f"{uri} is not a Hugging Face Llama checkpoint (expected config.json with "
                             "model_type 'llama' and weights)")
        model, info = load_hf_local(path, device, dtype)
        if info["tokenizer_path"] and path != uri:
            info["tokenizer_path"] = storage.join(uri, "tokenizer.model")
    return model, info
