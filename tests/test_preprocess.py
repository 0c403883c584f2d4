"""pipeline/preprocess/ without a full job: options, config checks, split choice, shard and BPE-sample planning,
and one encode task run as a plain function (Ray-backed tests are in test_preprocess_e2e.py)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from jpeglm import cli
from pipeline import packing, stats, storage
from pipeline.preprocess import cli as preprocess_cli
from pipeline.preprocess import config, encode, plan, write
from pipeline.preprocess.layout import Layout


def test_parse_size():
    assert preprocess_cli.parse_size("4MB") == 4_000_000
    assert preprocess_cli.parse_size("1GB") == 10**9
    assert preprocess_cli.parse_size("512MiB") == 512 * 2**20
    assert preprocess_cli.parse_size("1.5 kib") == 1536
    assert preprocess_cli.parse_size("123456") == 123456
    for bad in ("", "4XB", "-1MB", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            preprocess_cli.parse_size(bad)


@pytest.mark.parametrize("flags, message", [
    (["--shard-size", "lots"], "not a size"),
    (["--val-fraction", "1.5"], "must be in [0, 1)"),
    (["--seq-len", "0"], "must be >= 1"),
    (["--last-row", "truncate"], "invalid choice"),
])
def test_bad_flags_fail_at_once_with_a_message(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["preprocess", "--input", str(tmp_path), "--output", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["preprocess", "--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--tokenizer", "--bpe-sample", "--vocab-size", "--seq-len", "--images-per-unit",
                 "--shard-size", "--val-fraction", "--min-side", "--address", "--num-cpus", "--overwrite"):
        assert flag in text


def test_a_missing_input_is_refused_before_starting_anything(tmp_path, capsys):
    code = cli.main(["preprocess", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_is_a_stable_hash_of_the_id():
    ids = [f"img-{i:06d}.jpg" for i in range(20_000)]
    splits = [encode.split_of(i, 0.05) for i in ids]
    assert splits == [encode.split_of(i, 0.05) for i in ids]  # stable
    assert 0.04 < splits.count("validation") / len(ids) < 0.06
    assert all(encode.split_of(i, 0.0) == "train" for i in ids[:100])
    # growing the fraction only moves images train -> validation
    more = [encode.split_of(i, 0.10) for i in ids]
    assert all(b == "validation" for a, b in zip(splits, more) if a == "validation")


def test_plan_shards_covers_every_row_once_with_the_right_pieces():
    unit_tokens = [(0, 2500), (1, 0), (2, 1000), (3, 777)]  # unit 1 had no image of this split
    specs, rows, padding, dropped = write.plan_shards("train", unit_tokens, seq_len=1000, rows_per_shard=2,
                                                           last_row="pad")
    assert (rows, padding, dropped) == (5, 1000 * 5 - 4277, 0)
    assert [(s.first_row, s.num_rows) for s in specs] == [(0, 2), (2, 2), (4, 1)]
    assert [s.name for s in specs] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert specs[0].pieces == ((0, 0, 2500),)
    assert specs[1].pieces == ((0, 0, 2500), (2, 2500, 1000), (3, 3500, 777))  # rows 2-3 = tokens 2000..4000
    assert specs[2].pieces == ((3, 3500, 777),)  # row 4 = tokens 4000..4277, then padding
    specs, rows, padding, dropped = write.plan_shards("train", unit_tokens, 1000, 2, "drop")
    assert (rows, padding, dropped) == (4, 0, 277)
    assert write.plan_shards("validation", [(0, 0)], 1000, 2, "pad")[:2] == ([], 0)


def test_bpe_sample_spans_all_units():
    chosen, take = plan.bpe_sample_plan([1000] * 100, 10_000)
    assert chosen == list(range(100)) and take == 100
    chosen, take = plan.bpe_sample_plan([1000] * 23_000, 10_000)
    assert len(chosen) == 625 and take == 16 and chosen[0] == 0 and chosen[-1] > 22_900
    assert plan.bpe_sample_plan([5, None], 1000) == ([0, 1], 500)
    # small units: more of them are visited until their sizes add up
    chosen, take = plan.bpe_sample_plan([8] * 50, 40)
    assert take * len(chosen) >= 40 and sum(min(8, take) for _ in chosen) >= 40 and len(chosen) < 50
    assert plan.sample_positions(10, 4) == {0, 2, 5, 7}
    assert plan.sample_positions(3, 4) == {0, 1, 2}
    assert plan.sample_positions(None, 4) == 4


def test_estimated_row_bytes_matches_real_samples():
    import io

    from pipeline import shards

    rows = packing.pack([("some/long/image/id.jpg", np.arange(5000) % 300)], 1024, 1, 2)
    buf = io.BytesIO()
    shards.write_tar(buf, "train", rows)
    actual = (len(buf.getvalue()) - 10240) / len(rows)  # minus the end-of-archive record, at most
    est = write.estimated_row_bytes(1024)
    assert actual <= est <= actual * 1.3


def test_encode_task_as_a_plain_function(tmp_path, sample_image_dir):
    """One unit through encode_unit_task without Ray: stats rows, streams, done-marker, bad images counted."""
    from pipeline import codec
    from pipeline.tokenizer import Tokenizer

    names = sorted(p.name for p in sample_image_dir.iterdir())[:6]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes((sample_image_dir / names[0]).read_bytes()[:300])
    entries = [[n, str(sample_image_dir / n)] for n in names]
    entries += [["bad.jpg", str(bad)], ["gone.jpg", str(tmp_path / "gone.jpg")]]
    layout = Layout(str(tmp_path / "out"))
    storage.write_bytes(layout.unit(0), json.dumps({"kind": "files", "entries": entries}).encode())
    bodies = [codec.canonicalize((sample_image_dir / n).read_bytes()) for n in names]
    tok = Tokenizer.train(bodies, vocab_size=300)
    tok.save(layout.tokenizer_model)
    cfg = {"codec": config.codec_params(), "max_pixels": 10**8, "min_side": 0, "val_fraction": 0.3}

    done = encode.encode_unit_task(layout.output, 0, cfg, tok.fingerprint)

    table = stats.read(layout.stats(0)).to_pylist()
    assert [r["id"] for r in table] == names + ["bad.jpg", "gone.jpg"]
    assert [r["status"] for r in table] == ["ok"] * 6 + ["truncated", "read_error"]
    assert json.loads(storage.read_bytes(layout.encoded_done(0))) == done
    assert done["counts"]["status"] == {"ok": 6, "read_error": 1, "truncated": 1}
    for split in config.SPLITS:
        stream = np.frombuffer(storage.read_bytes(layout.stream(0, split)), dtype="<u2")
        expected = [packing.image_sequence(tok.encode(b), tok.bos_id, tok.eos_id)
                    for b, r in zip(bodies, table) if r["split"] == split]
        assert np.array_equal(stream, np.concatenate(expected) if expected else np.empty(0, "<u2"))
        assert done["counts"]["split_tokens"].get(split, 0) == len(stream)
    for r, b in zip(table, bodies):
        assert r["jpeg_bytes"] == len(b) and r["tokens"] == len(tok.encode(b)) and r["split"] in config.SPLITS
