"""trainer/model.py: the Llama decoder in plain PyTorch (no DeepSpeed here)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.loss import loss_and_counts
from trainer.model import KVCache, ModelConfig, Transformer, apply_rope, rope_cos_sin

SMALL = dict(vocab_size=320, n_layers=2, d_model=64, n_heads=4, ffn_dim=160, max_seq_len=128)


def model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


def tokens(batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_parameter_count_and_flops_match_the_paper_for_7b():
    cfg = ModelConfig()  # defaults are Llama-2 7B with vocab 320 and 12,288 context
    shape = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.vocab_size, cfg.max_seq_len)
    assert shape == (32, 4096, 32, 11008, 320, 12288)
    assert cfg.num_params() == 6_476_271_616  # ~6.48B non-embedding (docs: jpeglm-facts.md)
    assert cfg.flops_per_token() / 1e9 == pytest.approx(58.2, abs=0.05)  # 6N + 12*L*d*T


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "n_layers": 3}])
def test_num_params_counts_the_real_modules(overrides):
    m = model(**overrides)
    total = sum(p.numel() for p in m.parameters())
    assert m.cfg.num_params(non_embedding=False) == total
    assert m.cfg.num_params() == total - m.tok_embeddings.weight.numel() - m.output.weight.numel()
    assert all("bias" not in name for name, _ in m.named_parameters())
    assert m.output.weight.data_ptr() != m.tok_embeddings.weight.data_ptr()  # untied


def test_initialization_follows_init_std():
    m = model(init_std=0.05, d_model=128, ffn_dim=384)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        else:
            assert p.std().item() == pytest.approx(0.05, rel=0.1), name


def test_logits_are_causal_and_fp32():
    m = model()
    x = tokens()
    y = x.clone()
    y[:, 25:] = (y[:, 25:] + 7) % 320
    with torch.no_grad():
        a, b = m(x), m(y)
    assert a.dtype == torch.float32 and a.shape == (2, 40, 320)
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-6)
    assert not torch.allclose(a[:, 25:], b[:, 25:], atol=1e-3)
    with torch.no_grad():
        assert m.to(torch.bfloat16)(x).dtype == torch.float32


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads):
    m = model(n_kv_heads=n_kv_heads)
    x = tokens(length=30)
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, batch_size=2, max_len=30, device="cpu", dtype=torch.float32)
        parts = [m(x[:, :12], cache)]  # a prompt, then a chunk, then one token at a time
        parts.append(m(x[:, 12:20], cache))
        parts += [m(x[:, i : i + 1], cache) for i in range(20, 30)]
    assert cache.pos == 30
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"), torch.no_grad():
        m(x[:, :1], cache)


def test_grouped_query_attention_shares_key_value_heads():
    m = model(n_kv_heads=1)
    assert m.layers[0].attention.wk.weight.shape == (16, 64)  # one head of 16 instead of four
    assert m.cfg.num_params() < model().cfg.num_params()


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(head_dim, torch.tensor([m]), 10000.0)
        ck, sk = rope_cos_sin(head_dim, torch.tensor([n]), 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    # Position 0 is the identity rotation.
    c0, s0 = rope_cos_sin(head_dim, torch.tensor([0]), 10000.0)
    assert torch.allclose(apply_rope(q, c0, s0), q)


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss (trainer/loss.py): mean next-token cross-entropy over the targets that are not ignored."""
    return loss_and_counts(logits, targets.contiguous(), torch.ones(logits.size(-1), dtype=torch.float64))[0]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    x = tokens(length=33)
    results = []
    for every in (0, 1, 2):
        m = model(activation_checkpointing=every).train()
        loss = mean_loss(m(x[:, :-1]), x[:, 1:])
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6)
        assert all(torch.allclose(g, g0, atol=1e-6) for g, g0 in zip(grads, results[0][1]))


def test_untrained_loss_is_near_uniform_and_ignore_index_masks():
    m = model()
    x = tokens(length=41)
    with torch.no_grad():
        logits = m(x[:, :-1])
    assert mean_loss(logits, x[:, 1:]).item() == pytest.approx(math.log(320), abs=0.1)
    masked = x[:, 1:].clone()
    masked[:, 20:] = -100
    expected = torch.nn.functional.cross_entropy(logits[:, :20].reshape(-1, 320), x[:, 1:21].reshape(-1))
    assert mean_loss(logits, masked).item() == pytest.approx(expected.item(), abs=1e-6)


def test_config_validation_and_round_trip():
    cfg = ModelConfig(**SMALL, n_kv_heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**SMALL, "n_layer": 3})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(**{**SMALL, "n_heads": 5})
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        ModelConfig(**SMALL, n_kv_heads=3)
    with pytest.raises(ValueError, match="exceeds max_seq_len"), torch.no_grad():
        model()(tokens(length=129))
