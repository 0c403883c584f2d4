"""The trainer's run dir on a disk that fills up: the start-up warning, the estimate behind it, and a save that
fails on a real full filesystem (a 2-rank run on a tmpfs with size=): one line, exit code 1, no traceback from
any rank or thread, `latest` still the last complete checkpoint, and after the filesystem grows the same command
resumes to the weights of an undisturbed run. Mounting needs root: the run test skips without it."""

from __future__ import annotations

import contextlib
import os
import subprocess

import numpy as np
import pytest

from trainer import checkpoint as ckpt
from trainer import disk

from test_train_distributed import SMALL, assert_bitwise_equal, final_weights, run_to_end, torchrun

IS_ROOT = os.geteuid() == 0
ROW_LEN = 256
# a checkpoint every 5 steps, one kept: at the step-10 save, two checkpoints must fit
OVERRIDES = [*SMALL, "log.tensorboard=true", "train.micro_batch_size=2", "train.global_batch_size=4",
             "train.max_steps=15", "checkpoint.every_steps=5", "checkpoint.keep_last=1", "eval.every_steps=0",
             "eval.max_samples=4"]


@contextlib.contextmanager
def tmpfs(path, size: str):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Random rows of tokens the tokenizer knows (no preprocess run needed: the trainer only reads shards)."""
    from helpers import write_dataset
    from pipeline.tokenizer import Tokenizer

    root = str(tmp_path_factory.mktemp("rows"))
    tok = Tokenizer.train([bytes(range(256)) * 4], vocab_size=270)
    tok.save(os.path.join(root, "tokenizer.model"))
    rng = np.random.default_rng(0)
    write_dataset(root, {"train": [12, 12], "validation": [2]}, row_len=ROW_LEN, fingerprint=tok.fingerprint,
                  rows_source=lambda split, i: (rng.integers(3, tok.vocab_size, ROW_LEN).astype(np.uint16), ROW_LEN))
    return root


@pytest.fixture(scope="module")
def undisturbed(data, tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("undisturbed"))
    run_to_end(torchrun(2, data, run_dir, *OVERRIDES))
    return run_dir


def test_space_warning_counts_keep_last_plus_the_checkpoint_being_written(tmp_path):
    assert disk.checkpoint_bytes(10**6) == 12 * 10**6 + disk.OVERHEAD_BYTES
    free = disk.free_bytes(str(tmp_path))
    params = free // 12  # one checkpoint about fills the disk: keep_last=1 plus the one being written does not
    line = disk.space_warning(str(tmp_path / "run"), params, keep_last=1)
    assert line and "2 x" in line and "checkpoint.keep_last=1" in line and "\n" not in line
    assert disk.space_warning(str(tmp_path / "run"), 1000, keep_last=3) is None


@pytest.mark.slow
@pytest.mark.distributed
def test_the_estimate_covers_a_real_checkpoint(undisturbed):
    from trainer.config import load_config

    root = ckpt.checkpoints_dir(undisturbed)
    real = disk.folder_bytes(os.path.join(root, ckpt.latest_tag(root)))
    cfg = load_config("tiny", OVERRIDES)
    estimate = disk.checkpoint_bytes(cfg.model.num_params(non_embedding=False))
    print(f"checkpoint: {real:,} bytes on disk, estimated {estimate:,}")
    assert real <= estimate <= real + 2 * disk.OVERHEAD_BYTES


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs with size= needs root")
def test_a_full_run_dir_stops_in_one_line_and_the_rerun_resumes(data, undisturbed, tmp_path):
    root = ckpt.checkpoints_dir(undisturbed)
    one = disk.folder_bytes(os.path.join(root, ckpt.latest_tag(root)))
    others = disk.folder_bytes(undisturbed) - disk.folder_bytes(root)  # metrics, TensorBoard, sample records
    # room for one checkpoint and the run's other files, not for two checkpoints
    size = int(1.4 * one + others + 2**17) // 4096 * 4096
    with tmpfs(tmp_path / "disk", str(size)) as mount:
        run_dir = os.path.join(mount, "run")
        cmd = torchrun(2, data, run_dir, *OVERRIDES, launcher="trainer.launch")
        out = run_to_end(cmd, expect_rc=1).stdout
        assert "Traceback" not in out and "iostream error" not in out.replace("stopped: RuntimeError", ""), out
        assert "checkpoints need about" in out  # the start-up warning
        failed = [line for line in out.splitlines() if "saving the checkpoint of step 10 failed" in line]
        assert 1 <= len(failed) <= 2, out  # each rank that hit it, once
        assert "no space left on the device" in failed[0] and "needed" in failed[0] and "free" in failed[0]
        assert f"a rerun resumes from {os.path.join(run_dir, 'checkpoints', 'global_step5')}" in failed[0]
        assert ckpt.latest_tag(ckpt.checkpoints_dir(run_dir)) == "global_step5"  # the partial step 10 is not

        subprocess.run(["mount", "-o", f"remount,size={8 * size}", mount], check=True)  # the disk grows
        rerun = run_to_end(cmd).stdout
        assert "resumed from" in rerun and "global_step5" in rerun
        # the partial step-10 folder was overwritten, then pruned with step 5
        assert [n for n in os.listdir(ckpt.checkpoints_dir(run_dir)) if n.startswith("global_step")] == \
            ["global_step15"]
        assert_bitwise_equal(final_weights(run_dir), final_weights(undisturbed))
