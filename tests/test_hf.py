"""Hugging Face Llama interoperability: trainer/hf.py against the real `transformers` LlamaForCausalLM."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer import hf
from trainer.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(120)

# Grouped-query attention, a non-default rope_theta and norm_eps: a mapping that ignored any of them would
# change the logits.
TINY = dict(vocab_size=320, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256,
            rope_theta=50000.0, norm_eps=1e-5)


def _our_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    # Norm weights start at 1; perturb them so swapped norms would show up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens(seed: int = 1, batch: int = 2, length: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=g)


def _hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=tokens).logits.float()


def test_names_round_trip():
    cfg = ModelConfig(**TINY)
    names = list(Transformer(cfg).state_dict())
    hf_names = [hf.to_hf_name(n) for n in names]
    assert "model.layers.1.mlp.down_proj.weight" in hf_names and "lm_head.weight" in hf_names
    assert [hf.from_hf_name(n) for n in hf_names] == names
    with pytest.raises(KeyError):
        hf.from_hf_name("model.layers.0.self_attn.q_proj.bias")


def test_export_matches_transformers_logits(tmp_path):
    """ours -> save_hf -> LlamaForCausalLM.from_pretrained: same logits."""
    model = _our_model()
    files = hf.save_hf(model.state_dict(), model.cfg, str(tmp_path))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(files)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert hf_model.config.num_key_value_heads == 2
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens)
    theirs = _hf_logits(hf_model, tokens)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    # The comparison is sensitive: a different rope_theta is visible in the logits.
    wrong = Transformer(ModelConfig(**{**TINY, "rope_theta": 10000.0})).eval()
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(wrong(tokens), theirs, atol=1e-3)


def test_import_matches_transformers_logits(tmp_path):
    """LlamaForCausalLM (random) -> its own save_pretrained -> load_hf: same logits."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=50000.0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(str(tmp_path))
    assert hf.is_hf_dir(str(tmp_path))
    model, info = hf.load_hf(str(tmp_path))
    assert info["model_config"].rope_theta == 50000.0 and info["model_config"].n_kv_heads == 2
    assert (info["bos_id"], info["eos_id"]) == (1, 2)
    tokens = _tokens(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _hf_logits(hf_model, tokens), atol=2e-5, rtol=1e-4)


def test_sharded_and_tied_checkpoints_load(tmp_path):
    """transformers' sharded layout (model.safetensors.index.json) and tied embeddings both map."""
    torch.manual_seed(5)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, tie_word_embeddings=True,
    )
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model, _ = hf.load_hf(str(tmp_path))
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)
    tokens = _tokens(seed=6, length=32)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _hf_logits(hf_model, tokens), atol=2e-5, rtol=1e-4)


def test_save_hf_shards_round_trip_bf16(tmp_path):
    model = _our_model(seed=7)
    files = hf.save_hf(model.state_dict(), model.cfg, str(tmp_path), dtype=torch.bfloat16, max_shard_bytes=60_000)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = hf.load_hf(str(tmp_path))
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == torch.bfloat16
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k
    # transformers reads the same shards.
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = _tokens(seed=8, length=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.float()(tokens), _hf_logits(hf_model, tokens), atol=2e-5, rtol=1e-4)


def test_load_hf_from_s3(tmp_path, s3_bucket):
    from pipeline import storage

    model = _our_model(seed=9)
    local = tmp_path / "hf"
    hf.save_hf(model.state_dict(), model.cfg, str(local))
    uri = storage.join(s3_bucket, "models", "tiny-hf")
    for name in os.listdir(local):
        storage.write_bytes(storage.join(uri, name), (local / name).read_bytes())
    loaded, info = hf.load_hf(uri)
    assert info["model_config"] == model.cfg and info["tokenizer_path"] is None  # saved without one
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_unsupported_configs_are_refused(tmp_path):
    base = hf.hf_config(ModelConfig(**TINY))
    for change, needle in [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Llama"),
    ]:
        with pytest.raises(ValueError, match=needle):
            hf.model_config_from_hf({**base, **change})
    # Weights that do not fit the config are named.
    model = _our_model()
    hf.save_hf(model.state_dict(), model.cfg, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        hf.load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="not a Hugging Face Llama"):
        hf.load_hf(_empty(tmp_path))


def _empty(tmp_path) -> str:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


def test_exported_tokenizer_and_generation_match_transformers(tmp_path):
    """The exported folder's tokenizer files load as transformers' LlamaTokenizer with our ids and bytes, and
    transformers' greedy generate() from BOS gives our sampler's tokens."""
    from pipeline.sample_images import derive
    from pipeline.tokenizer import Tokenizer, bytes_to_text, text_to_bytes
    from trainer.generate import SamplingParams, generate

    files = [data for _, data in derive(8)]
    tok = Tokenizer.train(files[:6], 320)
    tok.save(str(tmp_path / "tok.model"))
    model = _our_model(seed=10, max_seq_len=4096, init_std=0.1)
    out = tmp_path / "hf"
    hf.save_hf(model.state_dict(), model.cfg, str(out), str(tmp_path / "tok.model"), tokenizer_meta=tok.metadata())
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert config["jpeglm"]["tokenizer"]["fingerprint"] == tok.fingerprint

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for data in files[6:]:
        text = bytes_to_text(data)
        ids = tok.encode(data)
        assert hf_tok(text)["input_ids"] == [tok.bos_id] + ids  # BOS added, no dummy-prefix space
        assert text_to_bytes(hf_tok.decode(ids)) == data  # HF decodes to Braille characters, one per byte

    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = [tok.bos_id] + tok.encode(files[6][:40])
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24)
    ours = generate(model, [prompt], 24, SamplingParams(temperature=0.0))[0].tokens
    assert theirs[0, len(prompt):].tolist() == ours


def test_the_codec_travels_with_exported_and_hugging_face_folders(tmp_path):
    """The image size a model was trained on reaches sampling from every kind of checkpoint (64x64 here)."""
    from trainer import pretrained
    from trainer.loading import checkpoint_codec

    model = _our_model()
    codec = {"size": 64, "quality": 25, "subsampling": "4:2:0", "restart_interval_mcus": 1}
    hf.save_hf(model.state_dict(), model.cfg, str(tmp_path / "hf"), codec=codec)
    pretrained.save_pretrained(model.state_dict(), model.cfg, str(tmp_path / "native"), codec=codec)
    assert hf.load_hf_local(str(tmp_path / "hf"))[1]["codec"] == codec
    assert pretrained.load_pretrained(tmp_path / "native")[1]["codec"] == codec  # a pathlib.Path works too
    assert checkpoint_codec(str(tmp_path / "hf")) == checkpoint_codec(str(tmp_path / "native")) == codec
    # transformers ignores our record and loads the folder as any Llama.
    assert transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).config.vocab_size == 320
    # Folders without the record (e.g. the authors' weights) mean the paper's 256x256 at quality 25.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["jpeglm"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert checkpoint_codec(str(tmp_path / "hf")) == {"size": 256, "quality": 25}


def test_run_codec_falls_back_to_the_training_data(tmp_path):
    from trainer.pretrained import run_codec

    (tmp_path / "data").mkdir()
    from pipeline.shards import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION

    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION,
                "codec": {"size": 48, "quality": 25}}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert run_codec({"codec": {"size": 96, "quality": 30}, "data": {"uri": str(tmp_path / "data")}})["size"] == 96
    assert run_codec({"data": {"uri": str(tmp_path / "data")}}) == {"size": 48, "quality": 25}
    assert run_codec({"data": {"uri": str(tmp_path / "moved")}}) == {"size": 256, "quality": 25}  # warned
