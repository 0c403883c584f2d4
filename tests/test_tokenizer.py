"""pipeline/tokenizer.py: exact byte round trips, special ids, save/load (local + moto S3), deterministic
fingerprints, foreign SentencePiece models with the same mapping, and refusal of models without it."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.tokenizer import ALL_BYTES, BYTE_OFFSET, MAX_BODY_BYTES, Tokenizer, bytes_to_text, text_to_bytes

NUM_BODIES = 200
TRAIN_BODIES = 100  # the rest are held out


def _jpeg_body(data: bytes) -> bytes:
    from pipeline.codec import canonicalize

    return canonicalize(data)


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    from pipeline.sample_images import derive

    return [_jpeg_body(data) for _, data in derive(NUM_BODIES)]


@pytest.fixture(scope="module")
def tok(bodies) -> Tokenizer:
    return Tokenizer.train(bodies[:TRAIN_BODIES], vocab_size=320)


# Every third byte value never occurs in this training sample.
ABSENT_FROM_NARROW = bytes(range(0, 256, 3))


@pytest.fixture(scope="module")
def narrow_tok(bodies) -> Tokenizer:
    sample = [b.translate(None, delete=ABSENT_FROM_NARROW) for b in bodies[:20]]
    assert not set(b"".join(sample)) & set(ABSENT_FROM_NARROW)
    return Tokenizer.train(sample, vocab_size=320)


# ---- the byte <-> character mapping ------------------------------------------------------------------------------


def test_mapping_is_chr_0x2800_plus_byte_and_inverts():
    reference = "".join(chr(0x2800 + b) for b in ALL_BYTES)
    assert BYTE_OFFSET == 0x2800
    assert bytes_to_text(ALL_BYTES) == reference
    assert text_to_bytes(reference) == ALL_BYTES
    assert bytes_to_text(b"") == "" and text_to_bytes("") == b""
    assert bytes_to_text(bytearray(b"\xff\xd8")) == "\u28ff\u28d8"


@pytest.mark.parametrize("bad", ["a", "\u27ff", "\u2900", " ", "\u2581", "\U0001f600"])
def test_text_to_bytes_rejects_characters_outside_the_mapping(bad):
    with pytest.raises(ValueError, match="position 1 is not a mapped byte"):
        text_to_bytes("\u2800" + bad + "\u2801")


# ---- round trips -------------------------------------------------------------------------------------------------


def test_every_byte_value_round_trips_even_when_absent_from_training(tok, narrow_tok):
    every_pair = b"".join(bytes([a, b]) for a in range(256) for b in range(256))
    for t in (tok, narrow_tok):
        assert t.missing_bytes == () and t.check_mapping() == []
        for b in range(256):
            ids = t.encode(bytes([b]))
            assert ids == [t._sp.piece_to_id(chr(0x2800 + b))]  # each byte has its own piece, never <unk>
            assert t.decode(ids) == bytes([b])
        for data in (ALL_BYTES, ALL_BYTES[::-1], every_pair, b"\x00" * 1000, b"\xff" * 999):
            ids = t.encode(data)
            assert t.unk_id not in ids
            assert t.decode(ids) == data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000))
def test_arbitrary_byte_strings_round_trip(tok, narrow_tok, data):
    for t in (tok, narrow_tok):
        ids = t.encode(data)
        assert len(ids) <= len(data)
        assert t.decode(ids) == data
        assert t.decode([t.bos_id, *ids, t.eos_id]) == data


def test_held_out_photo_bodies_round_trip_at_about_one_byte_per_token(tok, bodies):
    held_out = bodies[TRAIN_BODIES:]
    ids = [tok.encode(b) for b in held_out]
    assert all(tok.decode(i) == b for i, b in zip(ids, held_out))
    assert all(len(i) < len(b) for i, b in zip(ids, held_out))  # the 61 merges always help on real bodies
    bytes_per_token = sum(map(len, held_out)) / sum(map(len, ids))
    assert 1.0 < bytes_per_token < 1.25  # the paper's setting gives ~1.05-1.1 at vocab 320


def test_encode_batch_equals_encode_one_by_one(tok, narrow_tok, bodies):
    one_by_one = [tok.encode(b) for b in bodies]
    assert tok.encode_batch(bodies) == one_by_one
    assert tok.encode_batch(bodies, num_threads=1) == one_by_one
    assert tok.encode_batch([]) == []
    assert narrow_tok.encode_batch(bodies[:5]) == [narrow_tok.encode(b) for b in bodies[:5]]


# ---- special ids -------------------------------------------------------------------------------------------------


def test_special_ids_and_metadata(tok, bodies):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, None, 320)
    ids = tok.encode(bodies[0])
    assert not {tok.unk_id, tok.bos_id, tok.eos_id} & set(ids)  # encode adds no BOS/EOS
    assert min(ids) >= 3 and max(ids) < 320
    meta = tok.metadata()
    assert meta == {
        "fingerprint": tok.fingerprint, "vocab_size": 320, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": None,
        "byte_offset": 0x2800,
    }


def test_decode_skips_bos_eos_anywhere_and_accepts_arrays(tok, bodies):
    import numpy as np
    import torch

    body = bodies[1]
    ids = tok.encode(body)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.eos_id]) == body
    half = len(ids) // 2
    assert tok.decode(ids[:half] + [tok.eos_id, tok.bos_id] + ids[half:]) == body
    assert tok.decode(np.array([tok.bos_id, *ids], dtype=np.uint16)) == body  # shard rows are uint16
    assert tok.decode(torch.tensor(ids)) == body
    assert tok.decode([]) == b"" and tok.decode([tok.bos_id, tok.eos_id]) == b""


@pytest.mark.parametrize(
    ("bad_ids", "message"),
    [([5, 0, 6], r"token 1 is <unk> \(id 0\)"), ([5, 320], "token 1: id 320 is not in the vocabulary"),
     ([-1, 5], "token 0: id -1 is not in the vocabulary")],
)
def test_decode_rejects_unk_and_out_of_range_ids(tok, bad_ids, message):
    with pytest.raises(ValueError, match=message):
        tok.decode(bad_ids)


def test_token_bytes_concatenate_to_decode(tok, bodies):
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    assert table[tok.unk_id] == table[tok.bos_id] == table[tok.eos_id] == b""
    assert sorted(p for p in table if len(p) == 1) == [bytes([b]) for b in range(256)]  # one piece per byte value
    assert sum(len(p) >= 2 for p in table) == 320 - 3 - 256  # the merges
    ids = [tok.bos_id, *tok.encode(bodies[2]), tok.eos_id]
    assert b"".join(table[i] for i in ids) == bodies[2]


# ---- save / load / fingerprint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_writes_the_fingerprinted_bytes_and_load_restores(tok, bodies, tmp_path, request, where):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    path = f"{root}/out/tokenizer.model"
    tok.save(path)
    from pipeline import storage

    stored = storage.read_bytes(path)
    assert stored == tok.model_bytes
    assert hashlib.sha256(stored).hexdigest() == tok.fingerprint
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode_batch(bodies[:10]) == tok.encode_batch(bodies[:10])
    if where == "local":  # a plain SentencePiece processor reads the same file and agrees
        sp = spm.SentencePieceProcessor(model_file=path)
        assert sp.encode(bytes_to_text(bodies[3])) == tok.encode(bodies[3])
        as_path = tmp_path / "pathlib" / "tokenizer.model"  # os.PathLike works wherever a path is taken
        tok.save(as_path)
        assert Tokenizer.load(as_path).fingerprint == tok.fingerprint


def test_from_bytes_and_pickle_keep_the_model(tok, bodies):
    for copy in (Tokenizer.from_bytes(tok.model_bytes), pickle.loads(pickle.dumps(tok))):
        assert copy.fingerprint == tok.fingerprint
        assert copy.encode(bodies[4]) == tok.encode(bodies[4])
    assert len(pickle.dumps(tok)) < len(tok.model_bytes) + 500  # ships as the model bytes


def test_training_is_deterministic_across_runs_and_processes(tok, bodies, tmp_path):
    again = Tokenizer.train(iter(bodies[:TRAIN_BODIES]), vocab_size=320)  # any iterable, streamed
    assert again.model_bytes == tok.model_bytes
    assert Tokenizer.train(bodies[1 : TRAIN_BODIES + 1]).fingerprint != tok.fingerprint
    assert Tokenizer.train(bodies[:TRAIN_BODIES], vocab_size=330).fingerprint != tok.fingerprint

    # A fresh interpreter with another hash seed gets the same model file.
    (tmp_path / "bodies.pkl").write_bytes(pickle.dumps(bodies[:TRAIN_BODIES]))
    script = textwrap.dedent(
        """
        import pickle, sys
        from pipeline.tokenizer import Tokenizer
        print(Tokenizer.train(pickle.load(open(sys.argv[1], "rb"))).fingerprint)
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "bodies.pkl")], env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )
    assert out.stdout.strip() == tok.fingerprint


def test_training_input_errors():
    with pytest.raises(ValueError, match="vocab_size must be in"):
        Tokenizer.train([b"\x00\x01"], vocab_size=258)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        Tokenizer.train([b"\x00\x01"], vocab_size=70000)
    with pytest.raises(ValueError, match="no non-empty bodies"):
        Tokenizer.train([b"", b""])
    with pytest.raises(TypeError, match="training body 1 is str"):
        Tokenizer.train([b"\x00\x01", "not bytes"])
    with pytest.raises(ValueError, match="training body 0 has"):
        Tokenizer.train([b"\x00" * (MAX_BODY_BYTES + 1)])


# ---- foreign models ----------------------------------------------------------------------------------------------


def _train_plain_spm(tmp_path, lines: list[str], name: str, **options) -> str:
    """A model trained with plain SentencePiece from a text file, as another project would (not via Tokenizer)."""
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / name), minloglevel=2, **options
    )
    return str(tmp_path / f"{name}.model")


def test_foreign_model_with_same_mapping_loads_and_round_trips(tmp_path, bodies):
    # SentencePiece defaults (NFKC normalization, dummy-prefix "▁"), other special ids, another vocab size.
    path = _train_plain_spm(
        tmp_path, [bytes_to_text(b) for b in bodies[:40]], "foreign", model_type="bpe", vocab_size=400,
        character_coverage=1.0, max_sentence_length=1 << 20, unk_id=3, bos_id=0, eos_id=1, pad_id=2,
    )
    foreign = Tokenizer.load(path)
    assert (foreign.bos_id, foreign.eos_id, foreign.pad_id, foreign.unk_id, foreign.vocab_size) == (0, 1, 2, 3, 400)
    assert foreign.check_mapping() == [] and foreign.missing_bytes == ()
    with open(path, "rb") as f:
        assert foreign.fingerprint == hashlib.sha256(f.read()).hexdigest()
    sp = spm.SentencePieceProcessor(model_file=path)
    for body in bodies[150:160] + [ALL_BYTES]:
        ids = foreign.encode(body)
        assert ids == sp.encode(bytes_to_text(body))  # the ids that model was trained on, dummy prefix included
        assert foreign.decode([0, *ids, 1, 2, 2]) == body
    assert foreign.encode_batch(bodies[150:160]) == [foreign.encode(b) for b in bodies[150:160]]


def test_foreign_model_lacking_bytes_loads_with_warnings_and_refuses_them(tmp_path, bodies, caplog):
    lacking = bytes(range(0xF0, 0x100))
    lines = [bytes_to_text(b.translate(None, delete=lacking)) for b in bodies[:20]]
    path = _train_plain_spm(
        tmp_path, lines, "lacking", model_type="bpe", vocab_size=300, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False, max_sentence_length=1 << 20,
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.tokenizer"):
        foreign = Tokenizer.load(path)
    assert foreign.missing_bytes == tuple(lacking)
    assert any("F0 F1 F2" in p for p in foreign.check_mapping())
    assert "no piece for byte values F0" in caplog.text

    fine = bodies[160].translate(None, delete=lacking)
    assert foreign.decode(foreign.encode(fine)) == fine
    with pytest.raises(ValueError, match="byte values .*FF.* that this tokenizer's vocabulary lacks"):
        foreign.encode(bodies[160])  # every body holds FF (markers)
    with pytest.raises(ValueError, match="lacks"):
        foreign.encode_batch([fine, bodies[160]])
    with pytest.raises(ValueError, match="vocabulary lacks byte values F0"):
        foreign.decode([foreign.unk_id])


def test_text_model_and_garbage_are_refused(tmp_path):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jackdaws".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    path = _train_plain_spm(tmp_path, lines, "text", model_type="bpe", vocab_size=120, hard_vocab_limit=False)
    with pytest.raises(ValueError, match=r"text\.model: not a byte-level JPEG tokenizer: \d+ of \d+ pieces"):
        Tokenizer.load(path)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_bytes(b"\x89PNG this is not a model")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "missing.model"))
