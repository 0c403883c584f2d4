"""`jpeglm preprocess` end to end on a local Ray: all three input kinds with bad images mixed in, local disk and a
real S3 API (moto), validated against schemas/; and the reliability promises: crashes of workers and of the driver,
transient S3 errors, refused mixing, byte-identical output whatever the workers, retries and restarts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pytest

from jpeglm import cli
from pipeline import codec, packing, shards, stats, storage
from pipeline.preprocess import executor
from pipeline.preprocess.config import PreprocessError
from pipeline.preprocess.shuffle import body_split
from pipeline.preprocess.faults import FAULT_ENV

from helpers import parquet_bytes, tar_bytes
from jpeglm.devtools.s3proxy import S3Proxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"
# Small rows and shards so that images span rows and there are several shards of each split.
# A few small buckets, so that the shuffle spans several bucket tasks; the mixed inputs hold one missing file of 49
# images (read_error, 2%: above the default --max-failed-fraction).
ARGS = ["--seq-len", "1024", "--images-per-unit", "8", "--shard-size", "200KB", "--val-fraction", "0.2",
        "--bpe-sample", "40", "--images-per-bucket", "3000", "--max-failed-fraction", "0.05"]


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """One local Ray for the module (2 CPUs), started after the S3 environment is set so its workers inherit it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, sample_image_dir):
    """Image files, an img2dataset-style tar, a Hugging Face Parquet and a path-column Parquet, with bad images
    of every kind mixed in. Returns (root, {id: (source bytes or None, expected status)})."""
    root = tmp_path_factory.mktemp("mixed")
    photos = sorted(sample_image_dir.iterdir())
    data = [p.read_bytes() for p in photos]
    expected: dict[str, tuple[bytes | None, str]] = {}

    def put(rel: str, content: bytes):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)

    for p, d in zip(photos[:22], data[:22]):
        put(f"photos/{p.name}", d)
        expected[f"photos/{p.name}"] = (d, "ok")
    jpeg = next(d for p, d in zip(photos, data) if p.suffix == ".jpg")
    for name, content, status in [("bad-empty.jpg", b"", "empty"),
                                  ("bad-text.png", b"hello, not a PNG", "not_an_image"),
                                  ("bad-truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")]:
        put(f"photos/{name}", content)
        expected[f"photos/{name}"] = (content, status)
    members = []
    for k, (p, d) in enumerate(zip(photos[22:34], data[22:34])):
        member = f"{k:09d}{p.suffix}"
        members += [(member, d), (f"{k:09d}.json", b'{"caption": "x"}')]
        expected[f"wds/00000.tar/{member}"] = (d, "ok")
    put("wds/00000.tar", tar_bytes(members))
    put("wds/00000.parquet", parquet_bytes(pa.table({"key": ["0"], "url": ["http://example.invalid/0.jpg"]}), row_group_size=4))
    hf_rows = [{"bytes": d, "path": p.name} for p, d in zip(photos[34:44], data[34:44])]
    hf_rows.append({"bytes": b"junk", "path": None})
    put("hf/train-00000.parquet", parquet_bytes(pa.table({"image": hf_rows}), row_group_size=4))
    for i, row in enumerate(hf_rows):
        expected[f"hf/train-00000.parquet#{i}"] = (row["bytes"], "ok" if i < 10 else "not_an_image")
    put("refs/img/a.jpg", data[44])
    put("refs/index.parquet", parquet_bytes(pa.table({"path": ["img/a.jpg", "img/missing.jpg"]}), row_group_size=4))
    # the same image twice: a Parquet file is a unit of its own at once, while image files wait for a full unit,
    # so the Parquet row comes first in unit order and is kept; the file is its duplicate
    expected["refs/img/a.jpg"] = (data[44], "duplicate")
    expected["refs/index.parquet#0"] = (data[44], "ok")
    expected["refs/index.parquet#1"] = (None, "read_error")
    return root, expected


def _run(inputs, output, *extra, expect=0):
    args = ["preprocess"] + [a for i in ([inputs] if isinstance(inputs, str) else inputs) for a in ("--input", i)]
    code = cli.main(args + ["--output", output, *ARGS, *extra])
    assert code == expect
    return code


def _subprocess(inputs: str, output: str, *extra, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "jpeglm", "preprocess", "--input", inputs, "--output", output, *ARGS, *extra],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout=240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _kill(proc: subprocess.Popen) -> str:
    """SIGKILL the driver's whole session: the driver and the Ray it started (its workers exit with the raylet).
    Returns what it printed."""
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out.decode(errors="replace")


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stdout.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _data_files(output: str) -> dict[str, bytes]:
    """The files that must be byte-identical between equivalent runs."""
    names = ["manifest.json", "tokenizer.model"]
    names += [f"shards/{n}" for n in storage.listdir(storage.join(output, "shards"))]
    names += [f"stats/{n}" for n in storage.listdir(storage.join(output, "stats"))]
    return {n: storage.read_bytes(storage.join(output, n)) for n in names}


def _assert_same(a: dict[str, bytes], b: dict[str, bytes], skip=()):
    assert sorted(a) == sorted(b)
    differ = [n for n in a if n not in skip and a[n] != b[n]]
    assert differ == []


@pytest.fixture(scope="module")
def clean_local(ray_cluster, mixed_inputs, tmp_path_factory):
    root, _ = mixed_inputs
    out = str(tmp_path_factory.mktemp("clean") / "out")
    _run(str(root), out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# checks of one finished output


def _rows_by_split(output: str, manifest: dict) -> dict[str, list[tuple[np.ndarray, dict]]]:
    rows: dict[str, list] = {"train": [], "validation": []}
    for entry in manifest["shards"]:
        for key, tokens, meta in shards.read_samples(storage.join(output, entry["path"])):
            rows[entry["split"]].append((tokens, meta))
    return rows


def check_output(output: str, expected: dict[str, tuple[bytes | None, str]]) -> None:
    manifest = json.loads(storage.read_bytes(storage.join(output, "manifest.json")))
    jsonschema.validate(manifest, json.loads((SCHEMAS / "manifest.schema.json").read_text()))
    sample_schema = json.loads((SCHEMAS / "sample.schema.json").read_text())
    seq_len = manifest["seq_len"]
    assert not storage.exists(storage.join(output, "_work"))

    # shards: listed, complete, hashed, rows dense per split and matching the manifest
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(output, entry["path"]))
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    rows = _rows_by_split(output, manifest)
    for split, split_rows in rows.items():
        totals = manifest["totals"][split]
        assert [m["row"] for _, m in split_rows] == list(range(totals["rows"]))
        assert totals["tokens"] == totals["rows"] * seq_len
        entries = [e for e in manifest["shards"] if e["split"] == split]
        assert [e["first_row"] for e in entries] == list(np.cumsum([0] + [e["rows"] for e in entries])[:-1])
        padding = 0
        for tokens, meta in split_rows:
            jsonschema.validate(meta, sample_schema)
            assert tokens.dtype == np.dtype("<u2") and tokens.shape == (seq_len,)
            spans = meta["images"]
            assert spans[0]["start"] == 0 and spans[-1]["end"] == meta["valid_tokens"]
            assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:]))  # contiguous, no gaps
            assert all((tokens[s["start"]] == manifest["tokenizer"]["bos_id"]) == s["bos"] for s in spans)
            padding += seq_len - meta["valid_tokens"]
            assert np.all(tokens[meta["valid_tokens"]:] == manifest["pad_id"])
        assert padding == totals["padding_tokens"] < seq_len
        assert all(m["valid_tokens"] == seq_len for _, m in split_rows[:-1])  # only the last row is partial

    # per-image stats: every input image once, with the expected status; summary and manifest agree
    table = pa.concat_tables([stats.read(storage.join(output, "stats", n)) for n in
                              storage.listdir(storage.join(output, "stats"))]).to_pylist()
    assert {r["id"]: r["status"] for r in table} == {i: s for i, (_, s) in expected.items()}
    assert len(table) == len(expected)
    ok = [r for r in table if r["status"] == "ok"]
    assert manifest["images"] == {"total": len(expected), "ok": len(ok), "duplicate": 1,
                                  "failed": {"empty": 1, "not_an_image": 2, "read_error": 1, "truncated": 1}}
    dup = next(r for r in table if r["status"] == "duplicate")
    assert (dup["id"], dup["duplicate_of"]) == ("refs/img/a.jpg", "refs/index.parquet#0")
    summary = json.loads(storage.read_bytes(storage.join(output, "summary.json")))
    assert summary["images_ok"] == len(ok) and summary["failed_by_reason"] == manifest["images"]["failed"]
    assert summary["rows"] == {s: manifest["totals"][s]["rows"] for s in rows}
    for split in rows:
        assert manifest["totals"][split]["images"] == sum(r["split"] == split for r in ok) > 0

    # every ok image decodes from the shards to exactly canonicalize(source), in the stats' order
    from pipeline.tokenizer import Tokenizer

    tok = Tokenizer.load(storage.join(output, "tokenizer.model"))
    assert tok.fingerprint == manifest["tokenizer"]["fingerprint"]
    for split, split_rows in rows.items():
        order = [s["id"] for _, m in split_rows for s in m["images"] if s["bos"]]
        assert order == [r["id"] for r in ok if r["split"] == split]
        as_spans = [(t, m["images"]) for t, m in split_rows]
        for r in ok:
            if r["split"] != split:
                continue
            ids = packing.image_tokens(as_spans, r["id"])
            assert len(ids) == r["tokens"]
            body = tok.decode(ids.tolist())
            assert body == codec.canonicalize(expected[r["id"]][0]), r["id"]
            assert len(body) == r["jpeg_bytes"]


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_local_end_to_end(clean_local, mixed_inputs, tmp_path, capsys):
    root, expected = mixed_inputs
    check_output(clean_local, expected)

    # plain webdataset, no code of ours
    import webdataset as wds

    manifest = json.loads(Path(clean_local, "manifest.json").read_text())
    urls = [str(Path(clean_local, e["path"])) for e in manifest["shards"] if e["split"] == "train"]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == manifest["totals"]["train"]["rows"]
    assert samples[0]["tokens.npy"].dtype == np.uint16 and samples[0]["json"]["row"] == 0

    # jpeglm inspect: the summary, and one image (spanning rows) dumped back to the JPEG the model sees
    image_id = next(i for i in expected if i.startswith("wds/00000.tar/000000003."))
    target = tmp_path / "seen.jpg"
    assert cli.main(["inspect", clean_local, "--list", "3", "--failed", "10", "--verify", "--dump", image_id,
                     "--out", str(target)]) == 0
    text = capsys.readouterr().out
    assert "verify: " in text and "MISMATCH" not in text and "truncated" in text and "read_error" in text
    assert target.read_bytes() == codec.assemble(codec.canonicalize(expected[image_id][0]))
    assert cli.main(["inspect", clean_local, "--dump", "photos/bad-empty.jpg", "--out", str(target)]) == 2
    assert "not in the shards: empty" in capsys.readouterr().err


def test_inspect_into_a_closed_pipe_ends_quietly(clean_local):
    """`jpeglm inspect OUT --list 1000 | head`: the reader has left before anything is written; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "jpeglm", "inspect", clean_local, "--list", "1000"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started: the first print meets a closed pipe
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_s3_end_to_end_gives_the_same_shards(clean_local, mixed_inputs, s3_bucket, tmp_path):
    root, expected = mixed_inputs
    for path in sorted(root.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/in/{path.relative_to(root)}", path.read_bytes())
    out = f"{s3_bucket}/out"
    _run(f"{s3_bucket}/in", out)
    check_output(out, expected)
    local, remote = _data_files(clean_local), _data_files(out)
    # ids are relative to the input, so shards and tokenizer are identical; the config names the inputs
    _assert_same(local, remote, skip=["manifest.json"] + [n for n in local if n.startswith("stats/")])
    a, b = (json.loads(x["manifest.json"]) for x in (local, remote))
    assert a["config"]["inputs"] != b["config"]["inputs"]
    assert a["shards"] == b["shards"] and a["totals"] == b["totals"]
    storage.register_webdataset_s3()
    import webdataset as wds

    first = next(iter(wds.WebDataset(f"{out}/shards/validation-000000.tar", shardshuffle=False).decode()))
    assert first["json"]["split"] == "validation"
    image_id = next(i for i, (_, s) in expected.items() if s == "ok" and i.startswith("hf/"))
    target = tmp_path / "seen.jpg"
    assert cli.main(["inspect", out, "--verify", "--dump", image_id, "--out", str(target)]) == 0
    assert target.read_bytes() == codec.assemble(codec.canonicalize(expected[image_id][0]))


def test_one_worker_with_worker_deaths_equals_two_workers(clean_local, mixed_inputs, tmp_path):
    """A separate driver with a 1-CPU Ray; an encode task and a shard task (halfway through its tar) kill their
    worker process on the first attempt: Ray retries them and every byte equals the 2-worker run's."""
    root, _ = mixed_inputs
    out = str(tmp_path / "out")
    proc = _subprocess(str(root), out, "--num-cpus", "1", "--keep-work",
                       env_extra={FAULT_ENV: "encode:1:exit,bucket:1:exit,shard:train-000001:exit"})
    _finish(proc)
    assert sorted(os.listdir(Path(out, "_work", "faults"))) == ["bucket-1", "encode-1", "shard-train-000001"]  # all
    assert [p for p in os.listdir(Path(out, "shards")) if p.startswith(".")] == []  # the dead writer's temp is gone
    _assert_same(_data_files(clean_local), _data_files(out))
    assert json.loads(Path(out, "summary.json").read_text())["task_retries"] == {"worker_died": 3}


def test_killed_driver_reruns_to_identical_output(clean_local, mixed_inputs, tmp_path):
    root, _ = mixed_inputs
    out = tmp_path / "out"
    # 1. killed during the encode phase (unit 3 hangs until then)
    proc = _subprocess(str(root), str(out), env_extra={FAULT_ENV: "encode:3:hang"})
    _wait_for(lambda: (out / "_work/faults/encode-3").exists()
              and len(list((out / "_work/encoded/done").glob("0*.json"))) >= 2, "encode progress", proc)
    _kill(proc)
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()
    done_before = len(list((out / "_work/encoded/done").glob("0*.json")))
    assert 2 <= done_before < 8
    # 2. rerun, killed while shard train-000001 is half written
    proc = _subprocess(str(root), str(out), env_extra={FAULT_ENV: "shard:train-000001:hang"})
    _wait_for(lambda: (out / "_work/faults/shard-train-000001").exists(), "the shard phase", proc)
    time.sleep(0.5)
    log = _kill(proc)
    # finished units are skipped (a worker of the killed run may have finished one more while it went down)
    skipped = re.search(r"encode: (\d+) units? of 8 done before", log)
    assert skipped and done_before <= int(skipped.group(1)) < 8, log[-2000:]
    clean = _data_files(clean_local)
    visible = sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith("."))
    assert "train-000001.tar" not in visible  # never visible half-written
    for name in visible:  # whatever is visible is complete
        assert (out / "shards" / name).read_bytes() == clean[f"shards/{name}"]
    # 3. the same command finishes the job: only the missing shards are written
    _run(str(root), str(out))
    _assert_same(clean, _data_files(str(out)))
    assert json.loads((out / "summary.json").read_text())["images_this_run"] == 0


def test_rerun_is_a_no_op_and_another_config_is_refused(clean_local, mixed_inputs, tmp_path, capsys):
    root, _ = mixed_inputs
    out = tmp_path / "out"
    shutil.copytree(clean_local, out)
    before = _data_files(str(out))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    _run(str(root), str(out))  # same command: already complete
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    text = capsys.readouterr().out
    assert "is already complete (same config): nothing to do" in text and "this run" not in text
    assert "images/s" not in text and re.search(r"^images +51$", text, re.M)

    assert _run(str(root), str(out), "--seq-len", "2048", expect=2) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "seq_len: 1024 -> 2048" in err and "--overwrite" in err
    _assert_same(before, _data_files(str(out)))

    # another tokenizer is refused too; --overwrite replaces the output
    from pipeline.tokenizer import Tokenizer

    other = tmp_path / "other.model"
    bodies = [codec.canonicalize(b) for b, s in list(mixed_inputs[1].values())[:3]]
    Tokenizer.train(bodies, vocab_size=280).save(str(other))
    assert _run(str(root), str(out), "--tokenizer", str(other), expect=2) == 2
    assert "tokenizer fingerprint differs" in capsys.readouterr().err
    _run(str(root), str(out), "--tokenizer", str(other), "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["fingerprint"] == Tokenizer.load(str(other)).fingerprint
    assert manifest["tokenizer"]["vocab_size"] == 280

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("x")
    assert _run(str(root), str(tmp_path / "foreign"), expect=2) == 2
    assert "not a jpeglm preprocess output" in capsys.readouterr().err


def test_given_tokenizer_is_reused_and_gives_the_same_shards(clean_local, mixed_inputs, tmp_path):
    root, _ = mixed_inputs
    out = str(tmp_path / "out")
    _run(str(root), out, "--tokenizer", str(Path(clean_local, "tokenizer.model")), "--last-row", "drop")
    manifest = json.loads(Path(out, "manifest.json").read_text())
    clean_manifest = json.loads(Path(clean_local, "manifest.json").read_text())
    assert manifest["tokenizer"] == clean_manifest["tokenizer"]
    assert json.loads(Path(out, "tokenizer.json").read_text())["source"].endswith("tokenizer.model")
    for split in ("train", "validation"):
        t, c = manifest["totals"][split], clean_manifest["totals"][split]
        assert t["rows"] == c["rows"] - 1 and t["padding_tokens"] == 0
        assert t["dropped_tokens"] == manifest["seq_len"] - c["padding_tokens"]
    # all rows but the dropped last one are the same rows
    a, b = _rows_by_split(out, manifest), _rows_by_split(clean_local, clean_manifest)
    for split in a:
        assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a[split], b[split]))


def test_transient_s3_errors_are_retried(clean_local, mixed_inputs, s3_endpoint, s3_bucket):
    root, _ = mixed_inputs
    for path in sorted(root.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/in/{path.relative_to(root)}", path.read_bytes())
    # 5% of requests answered 503 SlowDown, as S3 does under load
    with S3Proxy(s3_endpoint, fault_fraction=0.05, seed=7) as proxy:
        proc = _subprocess(f"{s3_bucket}/in", f"{s3_bucket}/out", env_extra={"AWS_ENDPOINT_URL": proxy.endpoint})
        _finish(proc)
    served = proxy.stats()
    print(f"proxy: {served['faults']} of {served['requests']} requests failed")
    assert served["faults"] >= 10  # the job met plenty of errors ...
    clean = _data_files(clean_local)
    # ... and still wrote the same shards and tokenizer as the clean local run
    _assert_same(clean, _data_files(f"{s3_bucket}/out"),
                 skip=["manifest.json"] + [n for n in clean if n.startswith("stats/")])


_SLOW_SHARD_WRITER = """
import sys, time
import numpy as np
from pipeline import packing, shards
def rows():
    for i in range(4000):  # ~100 MB of rows at seq_len 12288; s3fs uploads a part per 50 MB
        if i > 2200:  # after the first part: slow, so the test can kill it mid-upload
            time.sleep(0.05)
        yield packing.Row(i, np.full(12288, i % 300, dtype="<u2"), 12288, ())
shards.write_shard(sys.argv[1], "train", rows())
"""


def test_a_shard_upload_killed_midway_leaves_no_object(s3_endpoint, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SHARD_WRITER, f"{s3_bucket}/shards/train-000000.tar"],
                            cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def parts_uploaded():
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return bool(uploads) and bool(client.list_parts(Bucket=bucket, Key=uploads[0]["Key"],
                                                        UploadId=uploads[0]["UploadId"]).get("Parts"))

    _wait_for(parts_uploaded, "a multipart upload with parts", proc)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # in progress: nothing visible
    _kill(proc)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # killed: still nothing


def test_bounded_never_has_more_than_max_in_flight_pending(ray_cluster):
    """Backpressure: submissions are consumed lazily, so the driver never queues the whole job."""
    task = executor.remote(body_split)
    submitted, finished, high_water = [], [], []

    def submissions():
        for i in range(12):
            def submit(i=i):
                submitted.append(i)
                high_water.append(len(submitted) - len(finished))
                return task.remote(bytes([i]) * 32, 0.5)
            yield i, submit

    for key, outcome in executor.bounded(submissions(), max_in_flight=3):
        finished.append(key)
        assert outcome.value == body_split(bytes([key]) * 32, 0.5)
    assert sorted(finished) == list(range(12))
    assert max(high_water) == 3


def test_a_failing_task_is_not_retried_and_stops_the_job_with_a_resume_hint(ray_cluster):
    """A bug (here a TypeError) is not transient: no retry, one line, its traceback in the log file."""
    task = executor.remote(body_split)
    executor.take_task_retries()
    with pytest.raises(PreprocessError, match=r"task bad failed: TypeError.*not retried.*rerunning the same "
                                              r"command resumes") as info:
        list(executor.run_bounded([("bad", lambda: task.remote(None, 0.5))], 2, 1, "encode (units)"))
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    assert executor.take_task_retries() == {}
    assert "Traceback" in Path(executor.log_path()).read_text()


def test_tasks_declare_the_memory_they_need(ray_cluster):
    """Ray reserves each task's declared memory (the worker's own plus its data), capped at the largest node."""
    import ray

    def assigned():
        import ray

        return ray.get_runtime_context().get_assigned_resources()

    got = ray.get(executor.remote(assigned, 100 * 2**20).remote()).value
    assert got["CPU"] == 1 and got["memory"] == executor.WORKER_MEMORY + 100 * 2**20
    assert ray.get(executor.remote(assigned, 10**15).remote()).value["memory"] == executor.largest_node_memory()


def test_only_bad_images_is_an_error_but_the_stats_are_written(ray_cluster, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "in" / "b.png").write_bytes(b"")
    from pipeline.tokenizer import Tokenizer

    tok = tmp_path / "tok.model"
    Tokenizer.train([bytes(range(256)) * 4], vocab_size=270).save(str(tok))
    out = str(tmp_path / "out")
    assert _run(str(tmp_path / "in"), out, "--tokenizer", str(tok), expect=1) == 1
    assert "no image could be used" in capsys.readouterr().err
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["shards"] == [] and manifest["images"] == {"total": 2, "ok": 0, "duplicate": 0,
                                                               "failed": {"empty": 1, "not_an_image": 1}}


# ---------------------------------------------------------------------------------------------------------------
# a Ray cluster of two nodes (tests/conftest.py: two_node_ray; the worker node cannot see one folder)


def test_two_node_cluster_with_s3_in_and_out_writes_the_one_node_bytes(clean_local, mixed_inputs, two_node_ray,
                                                                       s3_bucket):
    """The same job on a two-node cluster (through RAY_ADDRESS) with S3 input and output: the shards and tokenizer
    are the bytes of the one-node local run (ids are relative to the input, so local and S3 inputs give the same
    ids; sources in the stats and the manifest's input URIs differ, as they should)."""
    root, _ = mixed_inputs
    for path in sorted(root.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/in/{path.relative_to(root)}", path.read_bytes())
    proc = _subprocess(f"{s3_bucket}/in", f"{s3_bucket}/out", env_extra=two_node_ray.env())
    _finish(proc)
    clean = _data_files(clean_local)
    _assert_same(clean, _data_files(f"{s3_bucket}/out"),
                 skip=["manifest.json"] + [n for n in clean if n.startswith("stats/")])


def test_a_node_that_cannot_see_the_local_output_refuses_at_start(mixed_inputs, two_node_ray):
    root, _ = mixed_inputs
    out = os.path.join(two_node_ray.hidden[0], "e2e", "out")
    proc = _subprocess(str(root), out, env_extra=two_node_ray.env())
    text = proc.communicate(timeout=240)[0].decode(errors="replace")
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and "use s3:// or a filesystem shared by all nodes" in errors[0], text[-3000:]
    assert not os.path.exists(os.path.join(two_node_ray.hidden[0], "e2e"))  # nothing written
