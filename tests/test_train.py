"""`jpeglm train` without launching it: config + overrides, the DeepSpeed config, the LR schedule, checkpoint
bookkeeping (latest / keep-K / incomplete saves), metrics and plots. The DeepSpeed runs are in
test_train_distributed.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jpeglm import plots
from jpeglm.cli import main
from trainer import checkpoint as ckpt
from trainer import metrics
from trainer.config import ConfigError, OptimizerConfig, gradient_accumulation_steps, load_config
from trainer.ds_config import deepspeed_config
from trainer.optim import lr_at
from trainer.rng import micro_batch_seed

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_cli_refuses_bad_overrides_before_touching_anything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", "tiny", "--data", str(tmp_path / "nothing"), "--run-dir", str(run_dir),
               "model.n_layerz=2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "jpeglm train: error:" in err and "model.n_layerz" in err and "n_layers" in err
    assert not run_dir.exists()
    # Data problems are reported the same way, also before any process group exists.
    rc = main(["train", "--config", "tiny", "--data", str(tmp_path / "nothing"), "--run-dir", str(run_dir)])
    assert rc == 2 and "no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", "tiny"])  # missing --data / --run-dir: argparse's usage error
    assert "required: --data, --run-dir" in capsys.readouterr().err


def test_deepspeed_config_keeps_the_global_batch_on_any_world_size():
    cfg = load_config("7b")
    for world, gas in [(1, 256), (8, 32), (64, 4), (256, 1)]:
        ds = deepspeed_config(cfg, world)
        assert ds["gradient_accumulation_steps"] == gas
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * gas * world == 256
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert "optimizer" not in ds and "scheduler" not in ds  # client torch AdamW; the LR is set per step
    assert deepspeed_config(cfg, 8, load_universal=True)["checkpoint"] == {"load_universal": True}
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size x processes"):
        gradient_accumulation_steps(cfg, 3)
    assert deepspeed_config(load_config("tiny"), 2)["bf16"]["enabled"] is False


def test_learning_rate_warms_up_then_decays_by_cosine():
    o = OptimizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, o, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # never 0, peak at the end of warmup
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(60, o, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the cosine
    assert lr_at(110, o, 110) == pytest.approx(1e-4) and lr_at(500, o, 110) == pytest.approx(1e-4)


def test_micro_batch_seeds_depend_on_the_position_only():
    seeds = {micro_batch_seed(1234, p) for p in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert micro_batch_seed(1234, 8) == micro_batch_seed(1234, 8) != micro_batch_seed(1235, 8)


def _fake_checkpoint(root: str, step: int, complete: bool = True) -> None:
    d = os.path.join(root, ckpt.tag_for(step))
    os.makedirs(d)
    with open(os.path.join(d, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"x")
    if complete:
        with open(os.path.join(d, ckpt.STATE_FILE), "w") as f:
            json.dump({"step": step}, f)


def test_latest_ignores_incomplete_saves_and_prune_keeps_k(tmp_path):
    run = tmp_path / "run"
    root = ckpt.checkpoints_dir(str(run))
    assert ckpt.find_resume("auto", str(run)) is None and ckpt.find_resume("none", str(run)) is None
    for step in (2, 4, 6, 8):
        _fake_checkpoint(root, step)
    _fake_checkpoint(root, 3, complete=False)  # a crash mid-save, older than the newest
    _fake_checkpoint(root, 10, complete=False)  # a crash mid-save of the newest: must not be resumed from
    os.makedirs(os.path.join(root, "global_step4_universal"))
    os.makedirs(os.path.join(root, "global_step4_universal.tmp-host-123"))  # a converter that died (convert.py)
    open(os.path.join(root, "global_step4_universal.failed"), "w").close()
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write("global_step10")  # e.g. written by another tool before the save completed
    assert ckpt.latest_tag(root) == "global_step8"
    assert ckpt.find_resume("auto", str(run)) == (root, "global_step8")
    with pytest.raises(ckpt.CheckpointError, match="already has checkpoints"):
        ckpt.find_resume("none", str(run))
    assert ckpt.resolve(os.path.join(root, "global_step4")) == (root, "global_step4")
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve(os.path.join(root, "global_step10"))
    removed = ckpt.prune(root, keep_last=2)
    assert removed == ["global_step2", "global_step3", "global_step4", "global_step4_universal",
                       "global_step4_universal.failed", "global_step4_universal.tmp-host-123"]
    # The newest incomplete folder stays until a later save passes it (a re-save of its step replaces it).
    assert sorted(os.listdir(root)) == ["global_step10", "global_step6", "global_step8", ckpt.LATEST]
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve(str(tmp_path / "elsewhere"))


def test_metrics_formulas_and_sinks(tmp_path):
    # 1000 tokens at ln(2) nats each spelling 1000 bytes = 1 bit per byte; at 2 bytes per token, half that.
    assert metrics.bits_per_byte(1000 * math.log(2), 1000) == pytest.approx(1.0)
    assert metrics.bits_per_byte(1000 * math.log(2), 2000) == pytest.approx(0.5)
    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert metrics.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert metrics.peak_tflops("NVIDIA H200") == 989.0 and metrics.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3", override=500) == 500.0
    assert metrics.peak_tflops(None) is None and metrics.peak_tflops("NVIDIA L4") is None
    t = metrics.throughput(tokens=17_000, seconds=1.0, flops_per_token=58.2e9, devices=1, peak=989.0)
    assert t["tflops_per_device"] == pytest.approx(989.4) and t["mfu"] == pytest.approx(1.0, abs=0.001)
    assert metrics.throughput(100, 1.0, 1e9, 2, None)["mfu"] is None

    logger = metrics.MetricsLogger(str(tmp_path), enabled=True, total_steps=3, initial_step=0)
    for step in (1, 2, 2, 3):  # step 2 twice: a resumed run replays steps after its checkpoint
        logger.log({"step": step, "loss": float(step) * (1.5 if step == 2 else 1)})
    logger.log({"step": 3, "loss": 0.5}, prefix="validation")
    logger.image("samples", np.full((20, 30, 3), 200, dtype=np.uint8), 3)
    logger.close()
    records = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [(r["kind"], r["step"], r["loss"]) for r in records] == [
        ("train", 1, 1.0), ("train", 2, 3.0), ("train", 3, 3.0), ("validation", 3, 0.5)]
    events = os.listdir(tmp_path / "tensorboard")
    assert len(events) == 1 and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
    images = [v for e in _tensorboard_events(tmp_path / "tensorboard" / events[0]) for v in e.summary.value
              if v.HasField("image")]
    assert [(v.tag, v.image.width, v.image.height) for v in images] == [("samples", 30, 20)]
    quiet = metrics.MetricsLogger(str(tmp_path / "rank1"), enabled=False, total_steps=3, initial_step=0)
    quiet.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists()


def _tensorboard_events(path):
    """The Event protos of an event file, as TensorBoard reads them (TFRecord: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, pos, out = open(path, "rb").read(), 0, []
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append(Event.FromString(data[pos + 12 : pos + 12 + n]))
        pos += 12 + n + 4
    return out


def test_line_plot_draws_each_series(tmp_path):
    from PIL import Image

    xs = list(range(100))
    path = plots.line_plot({"train": (xs, [5 - x / 50 for x in xs]), "validation": ([20, 60, 99], [4.7, 3.9, 3.1])},
                           str(tmp_path / "loss.png"), title="loss", xlabel="step", ylabel="nats")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (540, 960, 3)

    def pixels(hex_color: str) -> int:
        rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
        return int((img == rgb).all(axis=-1).sum())

    assert pixels(plots.COLORS[0]) > 500 and pixels(plots.COLORS[1]) > 50  # the line, the dots and legend swatches
    assert plots.nice_ticks(0, 99) == [0, 20, 40, 60, 80]
    assert plots.nice_ticks(3.1, 5.0) == [3.5, 4.0, 4.5, 5.0]
    hist = plots.histogram(np.random.default_rng(0).normal(size=1000), str(tmp_path / "h.png"), bins=20)
    assert os.path.getsize(hist) > 1000


def test_cuda_requested_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = main(["train", "--config", "tiny", "--data", str(tmp_path), "--run-dir", str(tmp_path / "run"),
               "train.device=cuda"])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_dry_run_exercises_every_step_on_cpu(tmp_path):
    """bench/gpu_check.py --dry-run: the GPU check's steps (imports, env, bench_train's 1b and 7b-slice cases,
    bench_sample) on CPU at small shapes. Both training loops train the same model on the same batch, so their
    first losses agree; every module the steps import is on the GPU image or carried in .whl/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["steps"]) == ["imports", "env", "train", "sample"] and report["dry_run"]
    imports = report["steps"]["imports"]
    assert imports["missing"] == [] and "deepspeed" in imports["carried"] and "torch" in imports["distributions"]
    assert set(imports["carried"]) <= gpu_check.CARRIED
    train = json.loads((tmp_path / "train.json").read_text())
    assert [c["case"] for c in train["cases"]] == ["1b", "7b-slice"]
    for case in train["cases"]:
        assert case["seq_len"] == 64 and case["model"]["d_model"] == 64 and case["precision"] == "fp32"
        for mode in ("plain", "zero3"):
            assert len(case[mode]["step_s"]) == 2 and case[mode]["tokens_per_s"] > 0
        assert case["plain"]["losses"][0] == pytest.approx(case["zero3"]["losses"][0], abs=1e-4)
        assert case["overhead_ratio"] == pytest.approx(case["zero3"]["step_s_median"] / case["plain"]["step_s_median"])
    figures = report["figures"]
    assert figures["matmul_tflops_measured"] > 0
    assert figures["train_7b-slice"]["zero3_tokens_per_s"] == train["cases"][1]["zero3"]["tokens_per_s"]
    assert figures["sample_tiny"]["images_per_min_batch2"] > 0 and figures["sample_tiny"]["tokens_per_image"] == 256
    assert "train_7b-slice" in proc.stdout and "img/min" in proc.stdout


def _run_cli(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`jpeglm ARGV` in a fresh interpreter; also returns which heavy modules it had imported when it ended."""
    code = ("import sys; from jpeglm.cli import main; rc = main(sys.argv[1:]); "
            "print('imported:', [m for m in ('torch', 'deepspeed') if m in sys.modules]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    imported = [line for line in proc.stdout.splitlines() if line.startswith("imported:")]
    return proc, imported


def test_run_dir_or_export_out_that_is_a_file_fails_in_one_line_before_loading_anything(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["train", "--config", "tiny", "--data", str(tmp_path), "--run-dir", str(afile)], "is a file, not a folder"),
        (["train", "--config", "tiny", "--data", str(tmp_path), "--run-dir", str(afile / "run")],
         f"is inside {afile}, which is a file"),
        (["export", "--checkpoint", str(tmp_path), "--out", str(afile)], "is a file, not a folder"),
        (["export", "--checkpoint", str(tmp_path), "--out", str(afile / "model")], "which is a file"),
    ]
    for argv, message in cases:
        proc, imported = _run_cli(*argv)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"jpeglm {argv[0]}: error: ") and message in lines[0], lines
        assert "choose another" in lines[0] and "Traceback" not in proc.stderr
        assert imported == ["imported: []"]  # refused before torch (let alone DeepSpeed) was imported
    assert afile.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_stop_request_notes_the_first_signal_and_exits_on_the_second():
    import signal

    from trainer.preemption import StopRequest

    stop = StopRequest()
    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    try:
        stop.install()
        assert not stop.requested() and stop.signum() == signal.SIGTERM  # another rank's signal: exit 143
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signum() == signal.SIGTERM and stop.name() == "SIGTERM"
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: no waiting for the checkpoint
        assert exc.value.code == 128 + signal.SIGINT
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_mfu_is_explained_once_not_logged_as_null():
    cpu = metrics.mfu_note(None, None, None)
    assert "not reported" in cpu and "log.peak_tflops=N" in cpu and "989" in cpu
    assert "NVIDIA L4 is not in trainer.metrics.PEAK_TFLOPS" in metrics.mfu_note(None, "NVIDIA L4", None)
    assert metrics.mfu_note(989.0, "NVIDIA H100 80GB HBM3", None).endswith("989 TFLOP/s per device (NVIDIA H100 80GB HBM3)")
    assert "(log.peak_tflops)" in metrics.mfu_note(500.0, None, 500.0)
    assert metrics.without_unknown(metrics.throughput(100, 1.0, 1e9, 2, None)).keys() == {"tokens_per_s", "tflops_per_device"}
    assert "mfu" in metrics.without_unknown(metrics.throughput(100, 1.0, 1e9, 2, 989.0))


def test_moving_average_starts_at_the_data_and_skips_padding_steps(tmp_path):
    from PIL import Image

    from trainer.run_dir import plot_losses

    assert plots.ema([4.0, 4.0, 4.0], span=3) == [4.0, 4.0, 4.0]  # bias-corrected: no ramp up from 0
    smooth = plots.ema([5.0, float("nan"), 3.0], span=3)
    assert smooth[0] == 5.0 and smooth[1] == 5.0 and 3.0 < smooth[2] < 5.0  # NaN (padding only) carries over
    assert math.isnan(plots.ema([float("nan"), 1.0])[0])
    rng = np.random.default_rng(0)
    noisy = [5 - s / 100 + rng.normal(0, 0.3) for s in range(300)]
    smooth = plots.ema(noisy)
    assert np.std(np.diff(smooth)) < np.std(np.diff(noisy)) / 5

    records = [{"kind": "train", "step": s + 1, "loss": v} for s, v in enumerate(noisy)]
    records += [{"kind": "validation", "step": s, "loss": 4.0 - s / 300} for s in (100, 200, 300)]
    path = plot_losses(str(tmp_path), records, config_name="trainer/configs/tiny.yaml")
    img = np.asarray(Image.open(path).convert("RGB"))

    def pixels(hex_color: str) -> int:
        rgb = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
        return int((img == rgb).all(axis=-1).sum())

    pale = plots._faint(plots.COLORS[0])
    assert pale != plots.COLORS[0]
    assert pixels(pale) > 300 and pixels(plots.COLORS[0]) > 500 and pixels(plots.COLORS[1]) > 50


def test_universal_conversion_is_agreed_by_file_without_a_process_group(tmp_path, capsys):
    """The waiting ranks learn the converter's outcome from files: its error, a stopped (stale) lock, or their own
    deadline with what to run. A real ds_to_universal fails on a checkpoint that has no ZeRO files."""
    import threading
    import time

    from trainer import convert

    root = str(tmp_path / "checkpoints")
    _fake_checkpoint(root, 4)
    final, lock, failed = convert._paths(root, "global_step4")

    with pytest.raises(ckpt.CheckpointError, match=r"waited 0 s .*jpeglm checkpoint convert .*global_step4"):
        convert.ensure_universal(root, "global_step4", convert=False, wait_s=0.2, poll_s=0.05)

    waiter_error = []

    def wait():
        try:
            convert.ensure_universal(root, "global_step4", convert=False, wait_s=120, poll_s=0.05)
        except ckpt.CheckpointError as e:
            waiter_error.append(str(e))

    waiter = threading.Thread(target=wait)
    waiter.start()
    with pytest.raises(ckpt.CheckpointError, match="ds_to_universal failed on global_step4"):
        convert.ensure_universal(root, "global_step4", convert=True, wait_s=120)
    waiter.join(timeout=60)
    assert len(waiter_error) == 1 and "failed" in waiter_error[0] and "ds_to_universal" in waiter_error[0]
    assert os.path.exists(failed) and not os.path.exists(lock) and not os.path.exists(final)
    assert not [n for n in os.listdir(root) if ".tmp-" in n]  # the converter's private folder is gone

    # A failure file from an earlier launch is not this launch's outcome: wait (and time out) instead.
    old = time.time() - 3600
    os.utime(failed, (old, old))
    with pytest.raises(ckpt.CheckpointError, match="waited"):
        convert.ensure_universal(root, "global_step4", convert=False, wait_s=0.2, poll_s=0.05)

    # A lock its holder stopped refreshing: waiters stop waiting, a converter takes it over.
    with open(lock, "w") as f:
        f.write("{}")
    os.utime(lock, (old, old))
    with pytest.raises(ckpt.CheckpointError, match="stopped .*not refreshed"):
        convert.ensure_universal(root, "global_step4", convert=False, wait_s=60, poll_s=0.05)
    assert convert._take_lock(lock) and not convert._take_lock(lock)  # taken over once; now held (fresh)
    assert json.load(open(lock))["pid"] == os.getpid()
    os.unlink(lock)

    # Done is a folder renamed into place: nothing to wait for, nothing to convert.
    os.makedirs(final)
    assert convert.ensure_universal(root, "global_step4", convert=False, wait_s=0) == "global_step4_universal"


def test_checkpoint_convert_command_needs_a_checkpoint_only_when_the_world_size_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["checkpoint", "convert", str(run), "--world-size", "8"]) == 0  # a launcher's first start
    assert "no checkpoint yet, nothing to convert" in capsys.readouterr().out
    root = ckpt.checkpoints_dir(str(run))
    _fake_checkpoint(root, 6)
    with open(os.path.join(root, "global_step6", ckpt.STATE_FILE), "w") as f:
        json.dump({"step": 6, "world_size": 8}, f)
    assert main(["checkpoint", "convert", str(run), "--world-size", "8"]) == 0
    assert "saved on 8 processes: no conversion needed" in capsys.readouterr().out
    assert main(["checkpoint", "convert", str(tmp_path / "nothing")]) == 2  # without --world-size: must exist
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["checkpoint", "convert", str(run), "--world-size", "0"]) == 2
    assert "--world-size must be >= 1" in capsys.readouterr().err


def test_one_loss_function_for_training_and_validation():
    """trainer/loss.py: the mean over valid targets for backward; the counts as totals (training) or per sequence
    (validation, summed per sample whatever the world size), both agreeing; padding-only rows count nothing."""
    import torch
    import torch.nn.functional as F

    from trainer.data import IGNORE_INDEX
    from trainer.loss import loss_and_counts

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 320, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 320, (3, 16), generator=g)
    targets[1, 10:] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX  # a row of padding only
    byte_lengths = torch.randint(0, 4, (320,), generator=g).double()
    loss, totals = loss_and_counts(logits, targets, byte_lengths)
    _, rows = loss_and_counts(logits, targets, byte_lengths, per_row=True)
    valid = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits.view(-1, 320), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.equal(loss, expected / 26) and loss.requires_grad
    assert totals.tolist() == pytest.approx([expected.item(), 26, byte_lengths[targets[valid]].sum().item()])
    assert rows.shape == (3, 3) and rows[2].tolist() == [0, 0, 0] and rows[:, 1].tolist() == [16, 10, 0]
    assert rows.sum(0).tolist() == pytest.approx(totals.tolist())
    padding = torch.full((1, 16), IGNORE_INDEX)
    loss, totals = loss_and_counts(logits[2:], padding, byte_lengths)
    assert loss.item() == 0 and totals.tolist() == [0, 0, 0]
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_per_row_counts_cost_one_cross_entropy(monkeypatch):
    """Validation's per-sequence counts come from the same per-token losses as its mean: one cross-entropy pass."""
    import torch
    import torch.nn.functional as F

    from trainer.loss import loss_and_counts

    calls = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: calls.append(k.get("reduction")) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 320, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 320, (2, 8), generator=g)
    byte_lengths = torch.ones(320, dtype=torch.float64)
    loss, rows = loss_and_counts(logits, targets, byte_lengths, per_row=True)
    assert calls == ["none"] and loss.requires_grad
    assert loss.item() == pytest.approx(rows[:, 0].sum().item() / 16)
