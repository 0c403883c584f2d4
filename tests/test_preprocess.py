"""pipeline/preprocess/ without a Ray job: options, checks made before anything starts, the content-addressed split,
shard and BPE-sample planning, done records, and the encode and shuffle tasks run as plain functions (Ray-backed
tests are in test_preprocess_e2e.py)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jpeglm import cli
from pipeline import packing, stats, storage
from pipeline.preprocess import checks, config, encode, plan, results, shuffle, write
from pipeline.preprocess import cli as preprocess_cli
from pipeline.preprocess.job import Job
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
    (["--max-failed-fraction", "2"], "must be in [0, 1)"),
    (["--seq-len", "0"], "must be >= 1"),
    (["--seed", "-1"], "must be >= 0"),
    (["--dedup", "fuzzy"], "invalid choice"),
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
                 "--shard-size", "--val-fraction", "--min-side", "--address", "--num-cpus", "--overwrite", "--seed",
                 "--dedup", "--images-per-bucket", "--max-failed-fraction", "--near-radius", "--exclude",
                 "--max-aspect-ratio"):
        assert flag in text


def test_curation_flags_are_refused_in_one_line_before_anything_starts(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert "--near-radius must be in [0, 12]" in _refused(capsys, [*base, "--near-radius", "13"])
    assert "--max-aspect-ratio must be >= 1" in _refused(capsys, [*base, "--max-aspect-ratio", "0.5"])
    err = _refused(capsys, [*base, "--exclude", str(tmp_path / "missing")])
    assert err.startswith("jpeglm preprocess: error: --exclude: input ") and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, [*base, "--exclude", str(tmp_path / "empty")])
    assert str(tmp_path / "empty") in err and "holds no images" in err
    assert not (tmp_path / "out").exists()


def _refused(capsys, argv) -> str:
    """Runs `jpeglm preprocess ...` in this process: must refuse with exit 2 and one line, before Ray starts."""
    import sys

    assert cli.main(["preprocess", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jpeglm preprocess: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    return err


def test_a_missing_input_is_refused_before_starting_anything(tmp_path, capsys):
    assert "does not exist" in _refused(capsys, ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_input_without_images_is_refused_before_creating_anything(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    assert "holds no images" in _refused(capsys, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unusable_outputs_are_refused_at_once(tmp_path, capsys, sample_image_dir):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    args = ["--input", str(sample_image_dir), "--output"]
    assert f"is inside {a_file}, which is a file" in _refused(capsys, args + [str(a_file / "sub" / "out")])
    assert "is a file, not a folder" in _refused(capsys, args + [str(a_file)])
    assert a_file.read_text() == "x"


def test_a_stale_start_with_another_config_is_no_finished_work(tmp_path, sample_image_dir):
    """A run that failed before any unit finished leaves only _work/config.json (and maybe the plan): the corrected
    run may start over; anything finished (an encoded unit) still makes another config refused."""
    out = tmp_path / "out"
    layout = Layout(str(out))
    storage.write_bytes(layout.work_config, json.dumps({"config": {"seq_len": 1}, "config_hash": "0" * 64}).encode())
    storage.write_bytes(layout.unit(0), b"{}")
    job = Job(out, {"inputs": [str(sample_image_dir)], "seq_len": 1024})
    assert job._output_state(overwrite=False) == "restart"
    results.write_record(layout.encoded_done, 0, {"unit": 0})
    with pytest.raises(config.PreprocessError, match="another config .*--overwrite"):
        job._output_state(overwrite=False)
    assert job._output_state(overwrite=True) == "replace"


def test_split_is_a_stable_hash_of_the_canonical_body():
    shas = [hashlib.sha256(f"body-{i}".encode()).digest() for i in range(20_000)]
    splits = [shuffle.body_split(h, 0.05) for h in shas]
    assert splits == [shuffle.body_split(h, 0.05) for h in shas]  # stable
    assert 0.04 < splits.count("validation") / len(shas) < 0.06
    assert all(shuffle.body_split(h, 0.0) == "train" for h in shas[:100])
    # growing the fraction only moves images train -> validation
    more = [shuffle.body_split(h, 0.10) for h in shas]
    assert all(b == "validation" for a, b in zip(splits, more) if a == "validation")


def test_buckets_are_consecutive_ranges_of_the_order_key():
    shas = [hashlib.sha256(f"body-{i}".encode()).digest() for i in range(5000)]
    keys = sorted(shuffle.order_key(h, seed=7) for h in shas)
    buckets = [shuffle.bucket_of(k, 13) for k in keys]
    assert buckets == sorted(buckets) and set(buckets) == set(range(13))  # sorted keys -> buckets in order
    assert max(np.bincount(buckets)) < 1.3 * 5000 / 13
    assert [shuffle.order_key(h, 7) for h in shas[:5]] != [shuffle.order_key(h, 8) for h in shas[:5]]


def test_plan_shards_covers_every_row_once_with_the_right_pieces():
    bucket_tokens = [(0, 2500), (1, 0), (2, 1000), (3, 777)]  # bucket 1 had no image of this split
    specs, rows, padding, dropped = write.plan_shards("train", bucket_tokens, seq_len=1000, rows_per_shard=2,
                                                      last_row="pad")
    assert (rows, padding, dropped) == (5, 1000 * 5 - 4277, 0)
    assert [(s.first_row, s.num_rows) for s in specs] == [(0, 2), (2, 2), (4, 1)]
    assert [s.name for s in specs] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert specs[0].pieces == ((0, 0, 2500),)
    assert specs[1].pieces == ((0, 0, 2500), (2, 2500, 1000), (3, 3500, 777))  # rows 2-3 = tokens 2000..4000
    assert specs[2].pieces == ((3, 3500, 777),)  # row 4 = tokens 4000..4277, then padding
    specs, rows, padding, dropped = write.plan_shards("train", bucket_tokens, 1000, 2, "drop")
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


def test_bucket_count_is_a_function_of_the_plan():
    assert plan.bucket_count([1000] * 23_000, 20_000) == 1150
    assert plan.bucket_count([5, 3], 20_000) == 1
    assert plan.bucket_count([None, 1000], 1000) == 1 + encode.TAR_IMAGES_ESTIMATE // 1000


def test_estimated_row_bytes_matches_real_samples():
    import io

    from pipeline import shards

    rows = packing.pack([("some/long/image/id.jpg", np.arange(5000) % 300)], 1024, 1, 2)
    buf = io.BytesIO()
    shards.write_tar(buf, "train", rows)
    actual = (len(buf.getvalue()) - 10240) / len(rows)  # minus the end-of-archive record, at most
    est = write.estimated_row_bytes(1024)
    assert actual <= est <= actual * 1.3


def test_result_log_resumes_from_chunks_and_the_few_records_after_them(tmp_path, monkeypatch):
    folder = str(tmp_path / "done")
    written = []
    log = results.ResultLog(folder, 10, chunk=4, keep=lambda r: {"n": r["n"]},
                            on_chunk=lambda first, recs: written.append((first, [r["n"] for r in recs])))
    for i in [1, 0, 3, 2, 4, 6, 7, 8, 9]:  # unit 5 still running when the driver dies
        results.write_record(folder, i, {"n": i, "big": "x" * 100})
        log.add(i, {"n": i, "big": "x" * 100})
    assert written == [(0, [0, 1, 2, 3]), (8, [8, 9])]
    assert [n for n in sorted(os.listdir(folder)) if n.startswith("chunk")] == ["chunk-000000.json", "chunk-000008.json"]

    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(os.path.basename(uri)) or real_read(uri))
    again = results.ResultLog(folder, 10, chunk=4)
    loaded = dict(again.load())
    assert sorted(reads) == ["000004.json", "000006.json", "000007.json", "chunk-000000.json", "chunk-000008.json"]
    assert loaded[0] == {"n": 0} and loaded[4] == {"n": 4, "big": "x" * 100} and 5 not in loaded
    assert again.todo() == [5]


def test_environment_failures_stop_the_job_with_the_top_reason_and_an_example():
    failed = {"read_error": 30, "unsupported": 12, "corrupt": 500, "truncated": 400, "duplicate": 900}
    examples = {"read_error": ["refs.parquet#3", "FileNotFoundError: gone.jpg"]}
    with pytest.raises(checks.EnvironmentFailures) as e:
        checks.check_environment_failures(2000, failed, examples, max_fraction=0.01)
    assert e.value.exit_code == 1
    msg = str(e.value)
    assert "42 of 2,000 images (2.1%)" in msg and "read_error (30)" in msg and "refs.parquet#3: FileNotFoundError" in msg
    assert "--max-failed-fraction" in msg
    checks.check_environment_failures(2000, failed, examples, max_fraction=0.05)  # under the threshold
    # input-quality reasons never count, however many
    checks.check_environment_failures(1000, {"corrupt": 900, "duplicate": 50}, {}, max_fraction=0.0)


def test_summary_of_a_finished_job_claims_no_work_of_this_run():
    summary = stats.summarize(stats.Counts(images=3, ok=3, status={"ok": 3}), rows={"train": 1}, shards={"train": 1},
                              shard_bytes=10, padding_tokens=0, dropped_tokens=0, wall_s=2.0, images_this_run=3,
                              cpus=2.0)
    assert "images processed this run" in stats.format_summary(summary)
    text = stats.format_summary(summary, this_run=False)
    assert "this run" not in text and "images/s" not in text and "images " in text
    assert [stats.plural(n, "shard") for n in (0, 1, 2, 1000)] == ["0 shards", "1 shard", "2 shards", "1,000 shards"]


def _tokenizer(sample_image_dir, names, path):
    from pipeline import codec
    from pipeline.tokenizer import Tokenizer

    bodies = [codec.canonicalize((sample_image_dir / n).read_bytes()) for n in names]
    tok = Tokenizer.train(bodies, vocab_size=300)
    tok.save(path)
    return tok, bodies


TASK_CONFIG = {"codec": config.codec_params(), "max_pixels": 10**8, "min_side": 0, "val_fraction": 0.3, "seed": 0,
               "dedup": "exact"}


def test_encode_task_as_a_plain_function(tmp_path, sample_image_dir):
    """One unit through encode_unit_task without Ray: its file grouped by bucket, failures' stats, done record."""
    names = sorted(p.name for p in sample_image_dir.iterdir())[:6]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes((sample_image_dir / names[0]).read_bytes()[:300])
    entries = [[n, str(sample_image_dir / n)] for n in names]
    entries += [["bad.jpg", str(bad)], ["gone.jpg", str(tmp_path / "gone.jpg")]]
    layout = Layout(str(tmp_path / "out"))
    storage.write_bytes(layout.unit(0), json.dumps({"kind": "files", "entries": entries}).encode())
    tok, bodies = _tokenizer(sample_image_dir, names, layout.tokenizer_model)

    done = encode.encode_unit_task(layout.output, 0, TASK_CONFIG, tok.fingerprint, 3)

    failed = stats.read(layout.unit_stats(0)).to_pylist()
    assert [(r["id"], r["status"]) for r in failed] == [("bad.jpg", "truncated"), ("gone.jpg", "read_error")]
    assert json.loads(storage.read_bytes(results.record_path(layout.encoded_done, 0))) == done
    assert (done["images"], done["ok"]) == (8, 6)
    assert done["counts"]["status"] == {"read_error": 1, "truncated": 1}
    assert done["examples"]["read_error"][0] == "gone.jpg" and done["retries"] == {}
    data = storage.read_bytes(layout.encoded(0))
    offsets = done["bucket_offsets"]
    assert len(offsets) == 4 and offsets[0] == 0 and offsets[-1] == len(data) == done["encoded_bytes"]
    seen = []
    for b in range(3):
        for im in shuffle.decode_records(data[offsets[b] : offsets[b + 1]], 0):
            body = bodies[im.position]
            assert im.body_sha256 == hashlib.sha256(body).digest()
            assert shuffle.bucket_of(shuffle.order_key(im.body_sha256, 0), 3) == b
            assert im.tokens.tolist() == tok.encode(body) and im.meta["jpeg_bytes"] == len(body)
            assert im.meta["id"] == names[im.position]
            seen.append(im.position)
    assert sorted(seen) == list(range(6))


def test_bucket_task_dedups_orders_and_splits_the_same_in_one_or_many_passes(tmp_path, sample_image_dir,
                                                                            monkeypatch):
    """Two units, the second holding byte-identical copies of two images of the first and of each other: each body
    is packed once (the first in listing order), sorted by order key; reading the bucket in 5 passes changes no
    byte, also of the stats file, written pass by pass in row groups of a fixed size (here 3 rows)."""
    monkeypatch.setattr(stats, "WRITER_ROW_GROUP_ROWS", 3)
    names = sorted(p.name for p in sample_image_dir.iterdir())[:8]
    copies = tmp_path / "copies"
    copies.mkdir()
    for n in names[:2]:
        (copies / f"copy-{n}").write_bytes((sample_image_dir / n).read_bytes())
    (copies / "copy-again.jpg").write_bytes((sample_image_dir / names[0]).read_bytes())
    units = [[[n, str(sample_image_dir / n)] for n in names],
             [[p.name, str(p)] for p in sorted(copies.iterdir())]]
    tok, bodies = _tokenizer(sample_image_dir, names, str(tmp_path / "tok.model"))

    def run(out: str, passes_bytes: int, dedup="exact") -> tuple[dict, list, dict]:
        layout = Layout(out)
        tok.save(layout.tokenizer_model)
        cfg = {**TASK_CONFIG, "dedup": dedup}
        records = []
        for i, entries in enumerate(units):
            storage.write_bytes(layout.unit(i), json.dumps({"kind": "files", "entries": entries}).encode())
            records.append(encode.encode_unit_task(out, i, cfg, tok.fingerprint, 1))
        shuffle.write_bucket_index(layout, 0, records)
        done = shuffle.shuffle_bucket_task(out, 0, 1, 2, 256, cfg, tok.bos_id, tok.eos_id, passes_bytes)
        rows = stats.read(layout.bucket_stats(0)).to_pylist()
        streams = {s: storage.read_bytes(layout.bucket_stream(0, s)) for s in config.SPLITS}
        streams["stats"] = storage.read_bytes(layout.bucket_stats(0))
        return done, rows, streams

    done, rows, streams = run(str(tmp_path / "one"), 10**9)
    assert done["passes"] == 1
    dups = [r for r in rows if r["status"] == "duplicate"]
    assert sorted((r["id"], r["duplicate_of"]) for r in dups) == sorted(
        [(f"copy-{names[0]}", names[0]), (f"copy-{names[1]}", names[1]), ("copy-again.jpg", names[0])])
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["id"] for r in ok) == names
    keys = [shuffle.order_key(bytes.fromhex(r["body_sha256"]), 0) for r in rows]
    assert keys == sorted(keys)  # stream order = order key; duplicates sit right after their kept image
    groups = pq.ParquetFile(io.BytesIO(streams["stats"])).metadata
    assert [groups.row_group(g).num_rows for g in range(groups.num_row_groups)] == [3, 3, 3, 2]
    for split in config.SPLITS:
        expected = [packing.image_sequence(tok.encode(bodies[names.index(r["id"])]), tok.bos_id, tok.eos_id)
                    for r in ok if r["split"] == split]
        assert streams[split] == (np.concatenate(expected).tobytes() if expected else b"")
        assert all(shuffle.body_split(bytes.fromhex(r["body_sha256"]), 0.3) == split for r in ok if r["split"] == split)
    assert done["counts"]["status"] == {"duplicate": 3, "ok": 8}

    many = run(str(tmp_path / "many"), max(1, sum(len(s) for s in streams.values()) // 5))
    assert many[0]["passes"] >= 5 and many[1] == rows and many[2] == streams

    _, rows_none, streams_none = run(str(tmp_path / "none"), 10**9, dedup="none")
    assert all(r["status"] == "ok" for r in rows_none) and len(rows_none) == 11
    assert sum(len(streams_none[s]) for s in config.SPLITS) > sum(len(streams[s]) for s in config.SPLITS)
