"""A newcomer's wrong turns (issue 12), each run as the user would: `jpeglm ...` in a subprocess. Every one must end
with a non-zero exit, one or two lines naming the problem and the fix, no Python traceback, and nothing left behind
that blocks the corrected command.

Ctrl-C is tested where the command is long-running: a real SIGINT to a running preprocess
(tests/test_preprocess_shuffle.py::test_ctrl_c_keeps_finished_work_and_says_how_to_resume) and to `make train`'s
launcher with two ranks (tests/test_train_distributed.py, the `preempted` fixture): exit 130, one message, no
traceback, and the same command resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "pipeline" / "photos" / "astronaut.jpg"


def jpeglm(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "jpeglm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or REPO)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """What the user reads on stderr, without argparse's usage block (its own two-line convention)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = [line for line in lines if line.startswith("jpeglm")]  # usage continuation lines are indented
    return lines


def assert_refused(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = error_lines(proc)
    assert 1 <= len(lines) <= 2, lines
    message = " ".join(lines)
    for word in words:
        assert word in message, message
    return message


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "notes.txt"
    f.write_text("a file, not a folder\n")
    return f


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    (d / "astronaut.jpg").write_bytes(PHOTO.read_bytes())
    return d


# -- preprocess ------------------------------------------------------------------------------------------------


def test_preprocess_output_under_a_file_fails_at_once(photos, a_file):
    proc = jpeglm("preprocess", "--input", photos, "--output", a_file / "sub")
    assert_refused(proc, str(a_file), "--output")


def test_preprocess_missing_input_names_it_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    proc = jpeglm("preprocess", "--input", tmp_path / "no-such-folder", "--output", out)
    assert_refused(proc, "no-such-folder")
    assert not out.exists()


def test_preprocess_empty_input_creates_nothing_so_the_corrected_rerun_is_not_blocked(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    proc = jpeglm("preprocess", "--input", tmp_path / "empty", "--output", out)
    assert_refused(proc, "empty")
    assert not out.exists()  # nothing there that the corrected command would call "another job's output"


@pytest.mark.parametrize("flag, value, words", [
    ("--shard-size", "lots", ["--shard-size", "not a size"]),
    ("--image-size", "100", ["--image-size", "multiple of 16"]),
    ("--val-fraction", "2", ["--val-fraction"]),
])
def test_preprocess_bad_flag_values_say_what_is_allowed(photos, tmp_path, flag, value, words):
    proc = jpeglm("preprocess", "--input", photos, "--output", tmp_path / "out", flag, value)
    assert_refused(proc, *words)
    assert not (tmp_path / "out").exists()


def test_inspect_of_a_folder_that_is_no_output(tmp_path):
    assert_refused(jpeglm("inspect", tmp_path), "manifest.json")


# -- train / export / checkpoint -------------------------------------------------------------------------------


def test_train_run_dir_that_is_a_file(a_file, tmp_path):
    proc = jpeglm("train", "--config", "tiny", "--data", tmp_path, "--run-dir", a_file)
    assert_refused(proc, str(a_file), "--run-dir")


def test_train_without_data_says_to_preprocess(tmp_path):
    proc = jpeglm("train", "--config", "tiny", "--data", tmp_path / "nothing", "--run-dir", tmp_path / "run")
    assert_refused(proc, "manifest.json", "preprocess")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--config", "70b"], ["70b"]),
    (["--config", "tiny", "optimizer.learning_rate=1"], ["optimizer.learning_rate"]),
])
def test_train_bad_config_names_the_key(tmp_path, args, words):
    proc = jpeglm("train", "--data", tmp_path, "--run-dir", tmp_path / "run", *args)
    assert_refused(proc, *words)


def test_export_out_that_is_a_file(a_file, tmp_path):
    proc = jpeglm("export", "--checkpoint", tmp_path, "--out", a_file)
    assert_refused(proc, str(a_file))


def test_export_of_a_folder_without_checkpoints(tmp_path):
    assert_refused(jpeglm("export", "--checkpoint", tmp_path, "--out", tmp_path / "export"), str(tmp_path))


def test_checkpoint_convert_of_a_file(a_file):
    assert_refused(jpeglm("checkpoint", "convert", a_file, "--world-size", "2"), str(a_file), "not a folder")



# -- eval ------------------------------------------------------------------------------------------------------


def test_eval_fid_of_a_single_image_says_how_many_it_needs(photos):
    assert_refused(jpeglm("eval", "fid", photos, photos), "holds 1 image", "at least 2")


def test_eval_feature_batch_zero_is_refused(photos):
    assert_refused(jpeglm("eval", "fid", photos, photos, "--feature-batch", "0"), "--feature-batch must be >= 1")


def test_eval_fid_of_a_missing_folder_names_it(photos, tmp_path):
    assert_refused(jpeglm("eval", "fid", photos, tmp_path / "nothing-here"), "nothing-here", "no such folder")
