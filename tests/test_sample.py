"""Sampling: KV-cache decoding, stop rules, sampling filters, and the `jpeglm sample` command end to end."""

from __future__ import annotations

import time

import pytest
import torch

from trainer.model import ModelConfig, Transformer
from trainer.generate import EOIDetector, GenerationStats, SamplingParams, generate, next_tokens

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

GREEDY = SamplingParams(temperature=0.0)


def _random_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # A larger init std than training uses gives peaked logits, so greedy choices are not float near-ties.
    cfg = ModelConfig(**{**dict(vocab_size=320, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                max_seq_len=128, init_std=0.1), **overrides})
    return Transformer(cfg).eval()


def _prompts(n: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 320, (length - 1,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def _greedy_reference(model: Transformer, prompt: list[int], n: int, eos_id: int | None = None) -> list[int]:
    """Greedy decoding by full recomputation, written independently of trainer.generate."""
    seq = list(prompt)
    for _ in range(n):
        t = int(model(torch.tensor([seq]))[0, -1].argmax())
        seq.append(t)
        if t == eos_id:
            break
    return seq[len(prompt):]


def test_kv_cache_greedy_equals_recomputation():
    model = _random_model()
    prompts = _prompts(3, 7)
    cached = generate(model, prompts, 60, GREEDY)
    recomputed = generate(model, prompts, 60, GREEDY, use_cache=False)
    for i, p in enumerate(prompts):
        ref = _greedy_reference(model, p, 60)
        assert cached[i].tokens == ref, f"row {i}: KV-cache decoding diverged from recomputation"
        assert recomputed[i].tokens == ref
        assert cached[i].stop == "max_tokens" and len(ref) == 60
    # Different prompts give different continuations, so the rows really are independent sequences.
    assert len({tuple(g.tokens) for g in cached}) == 3
    # Copies of one prompt are prefilled once and their cache rows copied: same tokens as decoding alone.
    shared = generate(model, [prompts[0]] * 3, 60, GREEDY)
    assert all(g.tokens == _greedy_reference(model, prompts[0], 60) for g in shared)


def test_finished_rows_leave_the_batch_without_disturbing_others():
    model = _random_model(seed=2)
    prompts = _prompts(4, 5, seed=3)
    solo = [_greedy_reference(model, p, 50) for p in prompts]
    # An EOS id that row 1 emits early makes row 1 stop while (some of) the others go on.
    k = next(k for k in range(2, 50) if solo[1][k] not in solo[1][:k])
    eos = solo[1][k]
    expected = [_greedy_reference(model, p, 50, eos_id=eos) for p in prompts]
    assert len(expected[1]) == k + 1 and max(len(e) for e in expected) > k + 10
    stats = GenerationStats()
    gens = generate(model, prompts, 50, GREEDY, eos_id=eos, stats=stats)
    for g, e in zip(gens, expected):
        assert g.tokens == e
        assert g.stop == ("eos" if e[-1] == eos else "max_tokens")
    assert stats.new_tokens == sum(len(e) for e in expected)  # finished rows cost nothing afterwards


def test_generation_stops_at_max_seq_len():
    model = _random_model(max_seq_len=32)
    gens = generate(model, _prompts(2, 10), 1000, GREEDY)
    assert [len(g.tokens) for g in gens] == [22, 22]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, _prompts(1, 32), 5, GREEDY)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1, 5], []], 5, GREEDY)


def test_prompts_of_different_lengths_decode_as_if_alone():
    """A batch of unequal prompts shares one cache: each row is fed its own prompt tokens until they run out, so
    every row gets exactly the tokens it gets decoded alone (greedy), and its own stop."""
    model = _random_model(seed=6)
    prompts = [p[:n] for p, n in zip(_prompts(4, 12, seed=7), (3, 12, 7, 5))]
    solo = [_greedy_reference(model, p, 20) for p in prompts]
    stats = GenerationStats()
    gens = generate(model, prompts, 20, GREEDY, stats=stats)
    assert [g.tokens for g in gens] == solo and all(g.stop == "max_tokens" for g in gens)
    assert stats.new_tokens == 4 * 20  # forced prompt tokens are not counted as generated
    # Without the cache (the reference path) and against the context limit: row totals stop at max_seq_len.
    assert [g.tokens for g in generate(model, prompts, 20, GREEDY, use_cache=False)] == solo
    short = _random_model(seed=6, max_seq_len=16)
    assert [len(g.tokens) for g in generate(short, prompts, 20, GREEDY)] == [13, 4, 9, 11]


def test_sampling_filters_and_seed():
    logits = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]] * 2000), dim=-1)
    g = torch.Generator().manual_seed(0)
    assert set(next_tokens(logits, SamplingParams(0.0), g).tolist()) == {5}
    top2 = next_tokens(logits, SamplingParams(1.0, top_k=2, top_p=1.0), g)
    assert set(top2.tolist()) == {4, 5}
    # softmax([..,3,4,5]): p5 = 0.64, p4 = 0.23, p3 = 0.086: nucleus 0.8 keeps {5, 4}, 0.9 adds 3.
    assert set(next_tokens(logits, SamplingParams(1.0, top_k=0, top_p=0.8), g).tolist()) == {4, 5}
    assert set(next_tokens(logits, SamplingParams(1.0, top_k=0, top_p=0.9), g).tolist()) == {3, 4, 5}
    free = next_tokens(logits, SamplingParams(1.0, top_k=0, top_p=1.0), g)
    assert len(set(free.tolist())) == 6
    # Frequencies follow the (tempered) distribution: token 5 is drawn ~64% of the time at T=1, more at T=0.5.
    assert 0.58 < (free == 5).float().mean() < 0.70
    cold = next_tokens(logits, SamplingParams(0.5, top_k=0, top_p=1.0), g)
    assert (cold == 5).float().mean() > 0.8
    # Same seed, same draws.
    a = next_tokens(logits, SamplingParams(), torch.Generator().manual_seed(7))
    b = next_tokens(logits, SamplingParams(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    for bad in (SamplingParams(-1.0), SamplingParams(top_k=-1), SamplingParams(top_p=0.0), SamplingParams(top_p=1.5)):
        with pytest.raises(ValueError):
            bad.validate()


def test_sampled_generation_is_reproducible():
    model = _random_model(seed=4)
    prompts = _prompts(3, 4, seed=5)
    runs = [generate(model, prompts, 30, SamplingParams(), generator=torch.Generator().manual_seed(11))
            for _ in range(2)]
    assert [g.tokens for g in runs[0]] == [g.tokens for g in runs[1]]
    other = generate(model, prompts, 30, SamplingParams(), generator=torch.Generator().manual_seed(12))
    assert [g.tokens for g in other] != [g.tokens for g in runs[0]]


def test_eoi_detection_across_token_boundaries():
    # id: 0 <unk>, 1 BOS, 2 EOS (no bytes), then byte pieces.
    table = [b"", b"", b"", b"\x12\xff", b"\xd9", b"\xab\xff\xd9\x00", b"\xff\x00", b"\x34", b"\xd9\x10"]
    det = EOIDetector(table)
    assert det.prompt_state([1, 3]) is True and det.prompt_state([1, 3, 7]) is False
    assert det.step(5, False) == (True, False)  # FF D9 inside one piece
    assert det.step(4, True)[0] is True  # FF | D9 split across pieces
    assert det.step(8, True)[0] is True
    assert det.step(4, False)[0] is False  # D9 alone is data
    assert det.step(6, False) == (False, False)  # stuffed FF 00
    # A special token between FF and D9 contributes no bytes and keeps the state.
    assert det.step(2, True) == (False, True)

    # Through generate(): a model forced to emit FF | D9 stops with reason "eoi".
    class Scripted(torch.nn.Module):
        def __init__(self, script):
            super().__init__()
            self.cfg = ModelConfig(vocab_size=len(table), n_layers=1, d_model=8, n_heads=2, ffn_dim=8, max_seq_len=64)
            self.script, self.weight = script, torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, cache=None):
            pos = (cache.pos if cache is not None else 0) + tokens.shape[1]
            if cache is not None:
                cache.pos = pos
            out = torch.full((tokens.shape[0], tokens.shape[1], len(table)), -1e9)
            out[:, -1, self.script[pos - 2]] = 0.0  # prompt length 2
            return out

    gens = generate(Scripted([7, 3, 7, 3, 4, 7, 7]), [[1, 7]], 20, GREEDY, eos_id=2, eoi=det)
    assert gens[0].tokens == [7, 3, 7, 3, 4] and gens[0].stop == "eoi"


# ---------------------------------------------------------------------------------------------- the command


import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def photo_bodies():
    from pipeline import codec
    from pipeline.sample_images import photo_bytes, photo_names

    return {n: codec.canonicalize(photo_bytes(n)) for n in photo_names()}


@pytest.fixture(scope="module")
def tokenizer_file(photo_bodies, tmp_path_factory):
    from pipeline.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    Tokenizer.train(list(photo_bodies.values()), 320).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def random_checkpoint(tokenizer_file, tmp_path_factory):
    """An exported jpeglm folder with a random tiny model (generates junk bytes, never EOS on purpose)."""
    from pipeline.tokenizer import Tokenizer
    from trainer.pretrained import save_pretrained

    model = _random_model(seed=21, max_seq_len=8192, init_std=0.02)
    d = tmp_path_factory.mktemp("ckpt") / "exported"
    save_pretrained(model.state_dict(), model.cfg, str(d), tokenizer_file, Tokenizer.load(tokenizer_file).metadata())
    return str(d)


def _sample(*argv: str) -> int:
    from jpeglm.cli import main

    return main(["sample", *argv])


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_unconditional_outputs_and_reproducibility(random_checkpoint, tmp_path):
    # Unconstrained (the paper's sampling): a random model is cut at the token limit and repaired into a file.
    args = ["--checkpoint", random_checkpoint, "--num", "3", "--batch", "2", "--max-tokens", "160", "--constrain",
            "none", "--seed", "5"]
    assert _sample(*args, "--out", str(tmp_path / "a")) == 0
    out = tmp_path / "a"
    summary = _summary(out)
    assert summary["checkpoint_kind"] == "jpeglm" and summary["dtype"] == "float32"
    assert len(summary["samples"]) == 3
    for i, s in enumerate(summary["samples"]):
        jpeg = (out / f"sample-{i:04d}.jpg").read_bytes()
        assert s["file"] == f"sample-{i:04d}.jpg" and s["jpeg_bytes"] == len(jpeg)
        assert jpeg.startswith(b"\xff\xd8") and jpeg.endswith(b"\xff\xd9")  # repaired into a whole file
        assert s["prompt_tokens"] == 1 and s["new_tokens"] + s["prompt_tokens"] <= 160
        assert s["stop"] in ("eos", "eoi", "max_tokens") and isinstance(s["complete"], bool)
        png = Image.open(out / f"sample-{i:04d}.png")
        assert png.size == (256, 256)
    t = summary["timing"]
    assert t["new_tokens"] == sum(s["new_tokens"] for s in summary["samples"]) and t["tokens_per_s"] > 0
    assert t["images_per_min"] > 0
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 260 + 4, 2 * 274 + 4)  # 3 samples -> 2 x 2 cells
    # The same flags give the same files; another seed gives other samples.
    assert _sample(*args, "--out", str(tmp_path / "b")) == 0
    assert _sample(*args[:-1], "6", "--out", str(tmp_path / "c")) == 0
    hashes = [[s["body_sha256"] for s in _summary(tmp_path / d)["samples"]] for d in "abc"]
    assert hashes[0] == hashes[1] and len(set(hashes[0])) == 3
    assert not set(hashes[2]) & set(hashes[0])
    for i in range(3):
        assert (tmp_path / "b" / f"sample-{i:04d}.jpg").read_bytes() == (out / f"sample-{i:04d}.jpg").read_bytes()


def _top_rows_equal(a: Image.Image, b: Image.Image, rows: int) -> bool:
    return a.crop((0, 0, 256, rows)).tobytes() == b.crop((0, 0, 256, rows)).tobytes()


def test_completion_keeps_prompt_rows(random_checkpoint, photo_bodies, tmp_path):
    from pipeline import codec
    from pipeline.repair import prompt_prefix
    from pipeline.sample_images import photo_bytes

    names = ["camera.jpg", "rocket.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(photo_bytes(n))
    out = tmp_path / "out"
    ratio = 0.25  # n = 8 markers: the top 64 rows
    assert _sample("--checkpoint", random_checkpoint, "--out", str(out),
                   "--prompt", *[str(tmp_path / n) for n in names], "--ratio", str(ratio),
                   "--num", "2", "--batch", "2", "--max-tokens", "2600", "--seed", "1") == 0
    summary = _summary(out)
    assert [s["prompt"] for s in summary["samples"]] == [str(tmp_path / n) for n in names for _ in range(2)]
    for i, s in enumerate(summary["samples"]):
        body = photo_bodies[os.path.basename(s["prompt"])]
        prefix = prompt_prefix(body, ratio)
        jpeg = (out / s["file"]).read_bytes()
        # Byte for byte: the repaired file is the prompt (tables spliced after SOI) followed by the model's bytes.
        assert jpeg.startswith(codec.assemble(prefix)), s["file"]
        assert len(jpeg) > len(codec.assemble(prefix)) + 2
        original = Image.open(io.BytesIO(codec.assemble(body))).convert("RGB")
        sample = Image.open(out / s["file"].replace(".jpg", ".png"))
        # Pixels: the prompt's rows decode identically (the last row also depends on the next rows' chroma,
        # which 4:2:0 upsampling interpolates).
        assert _top_rows_equal(original, sample, 8 * int(32 * ratio) - 1)
        assert not _top_rows_equal(original, sample, 256)
    grid = Image.open(out / "grid.png")  # per prompt: prompt, 2 completions, original
    assert grid.size == (4 * 260 + 4, 2 * 274 + 4)


def test_hf_and_s3_checkpoints(random_checkpoint, tokenizer_file, tmp_path, s3_bucket):
    from pipeline import storage
    from trainer import hf
    from trainer.pretrained import load_pretrained

    model, meta = load_pretrained(random_checkpoint)
    hf_dir = tmp_path / "hf"
    hf.save_hf(model.state_dict(), model.cfg, str(hf_dir), tokenizer_file)
    args = ["--num", "2", "--batch", "2", "--max-tokens", "64", "--constrain", "none", "--seed", "3"]
    assert _sample("--checkpoint", random_checkpoint, "--out", str(tmp_path / "ours"), *args) == 0
    assert _sample("--checkpoint", str(hf_dir), "--out", str(tmp_path / "hf-out"), *args) == 0
    uri = storage.join(s3_bucket, "exported")
    for name in os.listdir(random_checkpoint):
        storage.write_bytes(storage.join(uri, name), open(os.path.join(random_checkpoint, name), "rb").read())
    assert _sample("--checkpoint", uri, "--out", str(tmp_path / "s3-out"), *args) == 0
    assert _summary(tmp_path / "hf-out")["checkpoint_kind"] == "huggingface"
    assert _summary(tmp_path / "s3-out")["checkpoint_kind"] == "jpeglm"
    # Same weights, same seed: the same images whichever format they were loaded from.
    for i in range(2):
        ref = (tmp_path / "ours" / f"sample-{i:04d}.jpg").read_bytes()
        assert (tmp_path / "hf-out" / f"sample-{i:04d}.jpg").read_bytes() == ref
        assert (tmp_path / "s3-out" / f"sample-{i:04d}.jpg").read_bytes() == ref


def test_bf16_path_runs_on_cpu(random_checkpoint, tmp_path):
    assert _sample("--checkpoint", random_checkpoint, "--out", str(tmp_path), "--num", "2", "--max-tokens", "48",
                   "--constrain", "none", "--dtype", "bf16", "--device", "cpu") == 0
    assert _summary(tmp_path)["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ratio", "0.01", "--prompt", "PHOTO"], "--ratio 0.01 at 256x256 pixels: ratio 0.01 gives 0 of 16 MCU rows"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--num", "0"], "--num must be positive"),
        (["--prompt", "/nonexistent/image.jpg"], "--prompt /nonexistent/image.jpg: no such file"),
        (["--out", "FILE"], "is a file, not a folder"),
        (["--out", "FILE/sub"], "which is a file"),
    ],
)
def test_bad_flags_fail_with_one_line_before_loading(random_checkpoint, tmp_path, capsys, extra, message):
    from pipeline.sample_images import photo_bytes

    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "photo.jpg").write_bytes(photo_bytes("coins.jpg"))
    extra = [str(tmp_path / "photo.jpg") if a == "PHOTO" else str(tmp_path / a) if a.startswith("FILE") else a
             for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "out")]
    assert _sample("--checkpoint", random_checkpoint, *out, *extra) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jpeglm sample: error: ") and message in lines[0], captured.err
    assert "checkpoint" not in captured.err.lower() or "--checkpoint" in captured.err  # refused before loading


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_out_in_a_read_only_folder_is_refused_before_loading(random_checkpoint, tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        assert _sample("--checkpoint", random_checkpoint, "--out", str(tmp_path / "ro" / "out")) == 2
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "is not writable by this user" in lines[0] and "Traceback" not in captured.err, lines
    assert not (tmp_path / "ro" / "out").exists()


def test_missing_or_unknown_checkpoint_fails_with_a_message(tmp_path, capsys):
    assert _sample("--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")) == 2
    assert "nothing: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _sample("--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out")) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_prompt_too_long_for_the_context_names_the_largest_ratio_that_fits(random_checkpoint, tmp_path, capsys,
                                                                            caplog):
    from pipeline import codec
    from pipeline.repair import prompt_prefix
    from pipeline.sample_images import photo_bytes
    from pipeline.tokenizer import Tokenizer

    (tmp_path / "a.jpg").write_bytes(photo_bytes("astronaut.jpg"))
    tok = Tokenizer.load(os.path.join(random_checkpoint, "tokenizer.model"))
    body = codec.canonicalize(photo_bytes("astronaut.jpg"))
    lengths = {r: 1 + len(tok.encode(prompt_prefix(body, r / 16))) for r in range(1, 16)}
    limit = lengths[5] + 1  # rows 1..5 fit, 6 (ratio 0.375) does not
    assert _sample("--checkpoint", random_checkpoint, "--out", str(tmp_path / "out"), "--prompt",
                   str(tmp_path / "a.jpg"), "--max-tokens", str(limit)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"is {lengths[6]:,} tokens, not below the limit of {limit:,}" in err
    assert "the largest --ratio that fits is 0.3125" in err  # 5 of 16 rows
    # Without --max-tokens the model's context is the limit, and nothing is said about a flag the user never set.
    caplog.clear()
    assert _sample("--checkpoint", random_checkpoint, "--out", str(tmp_path / "ok"), "--num", "1") == 0
    assert "--max-tokens" not in caplog.text and "--max-tokens" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the whole loop


@pytest.fixture(scope="module")
def overfit_checkpoint(tmp_path_factory):
    """One photo through the real pipeline (`jpeglm preprocess`: codec, BPE, packing, shards), a small model trained
    on its packed row until it predicts every next token, exported as a Hugging Face Llama folder.

    Training is a plain PyTorch loop on the shard's row (DeepSpeed training is covered by the trainer's tests;
    `jpeglm train` would add ~10 s of process start-up per rank to an already ~40 s test)."""
    import subprocess
    import sys

    from pipeline import packing, shards
    from pipeline.sample_images import photo_bytes
    from pipeline.tokenizer import Tokenizer
    from trainer import hf
    from trainer.loss import loss_and_counts

    root = tmp_path_factory.mktemp("overfit")
    (root / "images").mkdir()
    (root / "images" / "rocket.jpg").write_bytes(photo_bytes("rocket.jpg"))
    pre = root / "preprocessed"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "jpeglm", "preprocess", "--input", str(root / "images"),
                           "--output", str(pre), "--bpe-sample", "1", "--seq-len", "4096", "--val-fraction", "0",
                           "--num-cpus", "1"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((pre / "manifest.json").read_text())
    tok = Tokenizer.load(str(pre / "tokenizer.model"))
    rows = [(t, meta["images"]) for shard in manifest["shards"]
            for _, t, meta in shards.read_samples(str(pre / shard["path"]))]
    assert len(rows) == 1 and len(rows[0][1]) == 1
    body_tokens = packing.image_tokens(rows, rows[0][1][0]["id"]).tolist()
    sequence = torch.tensor([[tok.bos_id] + body_tokens + [tok.eos_id]])

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=128, n_heads=4, ffn_dim=384, max_seq_len=4096)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
        byte_lengths = torch.ones(tok.vocab_size, dtype=torch.float64)  # loss_and_counts' byte sums: unused here
        for step in range(400):
            logits = model(sequence[:, :-1])
            loss = loss_and_counts(logits, sequence[:, 1:].contiguous(), byte_lengths)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            # Every next token is the argmax by a margin that float differences between this full forward and
            # KV-cache decoding cannot flip, so greedy decoding must retrace the image.
            logits = logits.detach()
            target = logits.gather(-1, sequence[:, 1:, None]).squeeze(-1)
            runner_up = logits.scatter(-1, sequence[:, 1:, None], float("-inf")).max(-1).values
            if float((target - runner_up).min()) > 1.0:
                break
        else:
            pytest.fail(f"the model did not memorize the image in 400 steps (loss {loss.item():.3f})")
        print(f"memorized {sequence.shape[1]} tokens in {step + 1} steps (loss {loss.item():.4f})")
    finally:
        torch.set_num_threads(before)
    hf.save_hf(model.state_dict(), cfg, str(root / "hf"), str(pre / "tokenizer.model"), tokenizer_meta=tok.metadata())
    return {"hf": str(root / "hf"), "preprocessed": str(pre), "image": str(root / "images" / "rocket.jpg"),
            "body_tokens": body_tokens,
            "tokenizer": tok, "steps": step + 1}


@pytest.mark.slow
def test_overfit_model_reproduces_the_image_exactly(overfit_checkpoint, tmp_path):
    from pipeline import codec
    from pipeline.sample_images import photo_bytes

    body = codec.canonicalize(photo_bytes("rocket.jpg"))
    assert overfit_checkpoint["tokenizer"].decode(overfit_checkpoint["body_tokens"]) == body
    out = tmp_path / "out"
    assert _sample("--checkpoint", overfit_checkpoint["hf"], "--out", str(out), "--num", "2", "--batch", "2",
                   "--temperature", "0") == 0
    summary = _summary(out)
    assert summary["checkpoint_kind"] == "huggingface"
    for i, s in enumerate(summary["samples"]):
        # Greedy from BOS retraces the canonical bytes and stops at their EOI; repair only splices the tables back.
        assert (out / s["file"]).read_bytes() == codec.assemble(body)
        assert s["stop"] == "eoi" and s["complete"] and s["new_tokens"] == len(overfit_checkpoint["body_tokens"])
        original = Image.open(io.BytesIO(codec.assemble(body))).convert("RGB")
        assert Image.open(out / f"sample-{i:04d}.png").tobytes() == original.tobytes()


@pytest.mark.slow
def test_overfit_model_completes_its_image(overfit_checkpoint, tmp_path):
    from pipeline import codec
    from pipeline.repair import prompt_prefix
    from pipeline.sample_images import photo_bytes

    body = codec.canonicalize(photo_bytes("rocket.jpg"))
    out = tmp_path / "out"
    assert _sample("--checkpoint", overfit_checkpoint["hf"], "--out", str(out), "--prompt", overfit_checkpoint["image"],
                   "--ratio", "0.375", "--num", "2", "--temperature", "0.5", "--seed", "0") == 0
    prefix = prompt_prefix(body, 0.375)
    original = Image.open(io.BytesIO(codec.assemble(body))).convert("RGB")
    for s in _summary(out)["samples"]:
        assert s["prompt_tokens"] == 1 + len(overfit_checkpoint["tokenizer"].encode(prefix))
        jpeg = (out / s["file"]).read_bytes()
        assert jpeg.startswith(codec.assemble(prefix))
        assert _top_rows_equal(original, Image.open(out / s["file"].replace(".jpg", ".png")), 8 * int(32 * 0.375) - 1)
        # What follows is the model's: a trained model continues with valid entropy data, so the repaired file
        # holds more than the prompt (a random model's junk is cut at its first invalid marker).
        assert len(jpeg) > len(codec.assemble(prefix)) + 500


@pytest.mark.slow
def test_training_run_dir_as_checkpoint(overfit_checkpoint, tmp_path):
    """`--checkpoint RUN_DIR` consolidates the DeepSpeed checkpoint of a real `jpeglm train` run, and samples the same
    bytes as its `jpeglm export --format hf` folder (same weights, same seed)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jpeglm", "train", "--config", "tiny", "--data", overfit_checkpoint["preprocessed"],
         "--run-dir", str(run), "train.max_steps=2", "train.seq_len=4096", "model.max_seq_len=4096",
         "train.micro_batch_size=1", "train.global_batch_size=1", "checkpoint.every_steps=2", "eval.every_steps=2"],
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from jpeglm.cli import main

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    args = ["--num", "2", "--batch", "2", "--max-tokens", "300", "--constrain", "none", "--seed", "4"]
    assert _sample("--checkpoint", str(run), "--out", str(tmp_path / "from-run"), *args) == 0
    assert _sample("--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "from-hf"), *args) == 0
    from_run, from_hf = _summary(tmp_path / "from-run"), _summary(tmp_path / "from-hf")
    assert (from_run["checkpoint_kind"], from_hf["checkpoint_kind"]) == ("training-run", "huggingface")
    # A run dir is identified by the checkpoint it resolved to (eval.json never mixes two steps of one run).
    assert (from_run["checkpoint_revision"], from_hf["checkpoint_revision"]) == ("global_step2 (step 2)", None)
    assert [s["body_sha256"] for s in from_run["samples"]] == [s["body_sha256"] for s in from_hf["samples"]]


def test_bench_sample_runs_with_small_shapes(tmp_path):
    """bench/bench_sample.py end to end on tiny shapes, in bf16 (the dtype of its GPU path)."""
    from helpers import load_bench

    bench = load_bench("bench_sample")
    out = tmp_path / "sample.json"
    assert bench.main(["--out", str(out), "--presets", "tiny", "--dtype", "bf16", "--batch", "2", "--new-tokens", "8",
                       "--window", "4", "--repeat", "2", "--tokens-per-image", "64", "--full-image",
                       "--threads-check"]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "bfloat16" and result["torch_threads"] == 1
    tiny = result["presets"]["tiny"]
    assert tiny["kv_vs_recompute"]["new_tokens_from_bos"] == 8 and tiny["kv_vs_recompute"]["speedup"] > 0
    assert set(tiny["images_per_min"]) == {"1", "2"} and tiny["images_per_min"]["2"]["context"] == 32
    assert set(tiny["full_image_measured"]) == {"1", "2"}
    threads = result["threads"]
    counts = {"1", str(threads["cores"])}
    assert set(threads["as_is_tokens_per_s"]) == set(threads["one_busy_process_tokens_per_s"]) == counts
    assert 1 <= threads["default_threads_now"] <= threads["cores"]


def test_thread_default_leaves_the_cores_other_processes_use(monkeypatch):
    import subprocess
    import sys

    from trainer import devices

    cores = len(devices.usable_cores())
    monkeypatch.setattr(devices, "busy_cores", lambda cores: 0.2)
    assert devices.default_threads() == cores  # a quiet machine: every usable core
    monkeypatch.setattr(devices, "busy_cores", lambda cores: len(cores) + 3.0)
    assert devices.default_threads() == 1  # busy: one thread, which cannot wait on a descheduled sibling
    monkeypatch.setattr(devices, "busy_cores", lambda cores: len(cores) - 1.0)
    assert devices.default_threads() == 1
    monkeypatch.undo()
    # A real busy process is seen within the measurement interval (a load average would take a minute), on the core
    # it runs on; the figure counts only the cores asked about (a pinned rank ignores the rest of the machine).
    first = devices.usable_cores()[0]
    spin = f"import os; os.sched_setaffinity(0, {{{first}}})\nwhile True: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        assert 0.5 <= devices.busy_cores([first]) <= 1.0
        assert devices.busy_cores(devices.usable_cores()) >= 0.5
    finally:
        busy.kill()
        busy.wait()
    from jpeglm.cli import build_parser

    help_text = " ".join(build_parser("sample")._subparsers._group_actions[0].choices["sample"].format_help().split())
    assert "usable cores minus those other processes keep busy now" in help_text
