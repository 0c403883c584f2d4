"""`jpeglm inspect` on an output written without Ray (tests/helpers.write_image_dataset): --dump reads only the
rows holding the image through the shard's row index, and falls back to streaming for a format-1 output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jpeglm import cli
from pipeline import codec, shards, stats, storage
from pipeline.inspect import Output

from helpers import write_image_dataset

SEQ_LEN = 256  # short rows: every image spans several rows


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """(root, {id: canonical body}): 12 images in one train shard, with the bucket stats inspect locates them by."""
    from pipeline.sample_images import derive
    from pipeline.tokenizer import Tokenizer

    bodies = [(name, codec.canonicalize(data, size=64)) for name, data in derive(12, seed=3)]
    tok = Tokenizer.train([b for _, b in bodies], 320)
    root = str(tmp_path_factory.mktemp("out"))
    write_image_dataset(root, {"train": bodies}, tok, seq_len=SEQ_LEN, size=64)
    stats.write(storage.join(root, "stats", "bucket-000000.parquet"),
                [stats.ImageStat(id=i, source=i, status=stats.OK, jpeg_bytes=len(b), tokens=len(tok.encode(b)),
                                 split="train") for i, b in bodies])
    return root, dict(bodies)


def test_dump_reads_only_the_rows_holding_the_image(output, tmp_path):
    root, bodies = output
    image_id = list(bodies)[-2]
    out = Output(root)
    rec, offset = out.locate(image_id)
    first_row = offset // SEQ_LEN
    assert first_row > 10  # far from the shard's start
    # Zero every byte of the shard before the image's first row (the size stays): a reader that streams the shard
    # from its start meets an end-of-archive there; the row index leads straight to the image's rows.
    entry = out.manifest["shards"][0]
    shard = Path(root, entry["path"])
    start = int(shards.read_index(Path(root, entry["index"]), entry["rows"])[first_row])
    data = shard.read_bytes()
    shard.write_bytes(bytes(start) + data[start:])
    try:
        jpeg, info = out.dump(image_id)
        assert jpeg == codec.assemble(bodies[image_id]) and info["rows"][0] == first_row
    finally:
        shard.write_bytes(data)


def test_format_1_output_is_streamed_and_gives_the_same_jpeg(output, tmp_path):
    root, bodies = output
    manifest = json.loads(Path(root, "manifest.json").read_text())
    manifest["format_version"] = 1
    for entry in manifest["shards"]:
        del entry["index"]
    old = tmp_path / "v1"  # the same files, with the manifest an older jpeglm wrote
    old.mkdir()
    for name in ("tokenizer.model", "stats", "shards"):
        os.symlink(Path(root, name), old / name)
    (old / "manifest.json").write_text(json.dumps(manifest))
    image_id = list(bodies)[-2]
    assert Output(str(old)).dump(image_id)[0] == codec.assemble(bodies[image_id])


def test_inspect_errors_are_one_line_from_the_cli(output, tmp_path, capsys):
    root, _ = output
    assert cli.main(["inspect", root, "--dump", "no-such-image", "--out", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeglm inspect: error: no image 'no-such-image'") and "Traceback" not in err
