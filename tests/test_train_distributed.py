"""`jpeglm train` for real: torchrun with 2 CPU processes, DeepSpeed ZeRO-3 over gloo, on data made by
`jpeglm preprocess` from the bundled photos. Runs are shared between tests (a launch costs ~10 s):

  reference   30 steps uninterrupted, checkpoint every 4        (uneven shards; ZeRO-3 init; the baseline)
  killed      SIGKILL of every process after step 6, then --resume auto          == reference, bitwise
  preempted   Ctrl-C (SIGINT to the process group, as a terminal sends it) to `python -m trainer.launch` (what
              `make train` runs) after step 5, checkpoint only on the signal; resumed on ONE process with
              activation checkpointing, checkpoints every 4 steps               == reference, bitwise
  widened     preempted's step-24 checkpoint (1 process) resumed on 2, the universal conversion made slower
              than the collective timeout                                        == reference, bitwise
  learning    150 steps of a small model on the full dataset; validation loss vs the unigram entropy
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jpeglm.devtools.processes import free_port, process_tree
from trainer import checkpoint as ckpt
from trainer.data import Manifest, SampleOrder, read_rows, read_sample_records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# A 0.1M-parameter model on 256-token windows: each step is ~0.1 s, so a launch is mostly startup.
SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_dim=176", "model.max_seq_len=256",
         "train.seq_len=256", "log.tensorboard=false", "log.every_steps=10"]
# 8 samples per step: 4 per rank on 2 processes, 2 micro-batches of 4 on one (so 2 -> 1 keeps the sums bitwise).
RESUME = [*SMALL, "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=30",
          "checkpoint.every_steps=4", "checkpoint.keep_last=3", "eval.every_steps=0", "eval.max_samples=8",
          "optimizer.warmup_steps=5"]
UNEVEN_SHARD_ROWS = [1, 2, 25, 3, 1, 8]  # 40 rows x 4 windows = 160 samples: 30 steps of 8 cross an epoch
LAUNCH_TIMEOUT = 240


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, data: str, run_dir: str, *overrides: str, launcher: str = "torch.distributed.run") -> list[str]:
    return [sys.executable, "-m", launcher, "--standalone", f"--nproc_per_node={nproc}",
            "-m", "trainer.train", "--config", "tiny", "--data", data, "--run-dir", run_dir, *overrides]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    for p in process_tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def run_to_end(cmd: list[str], expect_rc: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**_env(), **(env or {})}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {LAUNCH_TIMEOUT} s (hang?):\n{out[-5000:]}")
    assert proc.returncode == expect_rc, f"exit {proc.returncode}:\n{out[-8000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def interrupt_after(cmd: list[str], run_dir: str, step: int, sig: int, whole_tree: bool = False,
                    group: bool = False) -> tuple[int, str]:
    """Start cmd in a session of its own, wait until metrics.jsonl shows `step`, then send sig to the launcher, to
    its process group (what a terminal's Ctrl-C does; torchrun's workers have sessions of their own), or to it and
    every worker."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(metrics):
                with open(metrics) as f:
                    if any(json.loads(line)["step"] >= step for line in f if line.strip()):
                        break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.communicate()[0][-5000:]}"
        if whole_tree:
            kill_tree(proc.pid, sig)
        elif group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    return proc.returncode, out


def final_weights(run_dir: str) -> dict:
    from trainer.export import consolidate

    return consolidate(run_dir)[0]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert np.array_equal(a[name].numpy().view(np.int32), b[name].numpy().view(np.int32)), \
            f"{name}: max difference {(a[name] - b[name]).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_image_dir) -> str:
    """60 derived real photos through `jpeglm preprocess` (1,024-token rows, 64 KB shards, 10% validation)."""
    from jpeglm.cli import main

    out = str(tmp_path_factory.mktemp("preprocessed") / "out")
    assert main(["preprocess", "--input", str(sample_image_dir), "--output", out, "--seq-len", "1024", "--num-cpus",
                 "1", "--bpe-sample", "60", "--shard-size", "64KB", "--val-fraction", "0.1"]) == 0
    return out


@pytest.fixture(scope="module")
def uneven(dataset, tmp_path_factory) -> str:
    """The first 40 real train rows re-sharded into shards of 1, 2, 25, 3, 1 and 8 rows (plus the real
    validation shards and tokenizer): per-rank work must not depend on shard sizes."""
    from helpers import write_dataset

    real = Manifest.load(dataset)
    rows = {}
    for split in ("train", "validation"):
        for shard in real.split(split):
            for r, value in read_rows(shard, real.seq_len).items():
                rows[(split, r)] = value
    root = str(tmp_path_factory.mktemp("uneven"))
    n_val = real.raw["totals"]["validation"]["rows"]
    write_dataset(root, {"train": UNEVEN_SHARD_ROWS, "validation": [n_val]}, row_len=real.seq_len,
                  fingerprint=real.fingerprint, rows_source=lambda split, i: rows[(split, i)])
    shutil.copyfile(os.path.join(dataset, "tokenizer.model"), os.path.join(root, "tokenizer.model"))
    return root


@pytest.fixture(scope="module")
def reference(uneven, tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("reference"))
    run_to_end(torchrun(2, uneven, run_dir, *RESUME, "checkpoint.keep_last=10"))
    return run_dir


@pytest.fixture(scope="module")
def killed(uneven, tmp_path_factory) -> tuple[str, str]:
    run_dir = str(tmp_path_factory.mktemp("killed"))
    cmd = torchrun(2, uneven, run_dir, *RESUME)
    rc, first = interrupt_after(cmd, run_dir, step=6, sig=signal.SIGKILL, whole_tree=True)
    assert rc == -signal.SIGKILL
    return run_dir, first + run_to_end(cmd).stdout


@pytest.fixture(scope="module")
def preempted(uneven, tmp_path_factory) -> tuple[str, int, str, int]:
    run_dir = str(tmp_path_factory.mktemp("preempted"))
    no_periodic = [*RESUME, "checkpoint.every_steps=1000"]
    rc, out = interrupt_after(torchrun(2, uneven, run_dir, *no_periodic, launcher="trainer.launch"), run_dir, step=5,
                              sig=signal.SIGINT, group=True)
    stopped_at = ckpt.step_of(ckpt.latest_tag(ckpt.checkpoints_dir(run_dir)) or "")
    assert stopped_at is not None, f"no checkpoint after Ctrl-C:\n{out[-5000:]}"
    # Resume on ONE plain process (no launcher): a universal checkpoint conversion, then the same order. With
    # activation checkpointing on, which must not change a bit (recomputation under ZeRO-3 re-gathers the weights).
    resumed = run_to_end([sys.executable, "-m", "trainer.train", "--config", "tiny", "--data", uneven, "--run-dir",
                          run_dir, *RESUME, "model.activation_checkpointing=1"])
    return run_dir, stopped_at, out + resumed.stdout, rc


def test_zero3_init_really_initializes_the_weights(uneven, tmp_path):
    """Weights built under deepspeed.zero.Init (partitioned over 2 ranks) are the model's own initialization:
    identical to a plain Transformer built with the same seed, not zeros or DeepSpeed's empty partitions. The
    evaluation at the end also draws its grid of samples on both ranks (eval.sample_grid) into RUN/images/."""
    import torch

    from trainer.config import load_config
    from trainer.model import Transformer

    run_dir = str(tmp_path / "init")
    overrides = [*SMALL, "train.max_steps=0", "model.init_std=0.03", "eval.max_samples=8", "eval.sample_grid=1"]
    run_to_end(torchrun(2, uneven, run_dir, *overrides))
    assert os.listdir(os.path.join(run_dir, "images")) == ["step-000000.png"]
    weights = final_weights(run_dir)
    cfg = load_config("tiny", overrides)
    torch.manual_seed(cfg.train.seed)
    plain = Transformer(cfg.model).state_dict()
    assert_bitwise_equal(weights, plain)
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            assert torch.all(w == 1.0), name
        else:
            assert abs(w.std().item() - 0.03) < 0.003 and abs(w.mean().item()) < 0.003, name
    assert not torch.equal(weights["layers.0.attention.wq.weight"], weights["layers.1.attention.wq.weight"])


def test_sigkill_then_resume_is_bitwise_equal_and_uses_every_sample_once(reference, killed, uneven):
    run_dir, out = killed
    resumed = re.search(r"resumed from \S+global_step(\d+) at step (\d+)", out)
    assert resumed and int(resumed.group(2)) in (4, 8), out[-3000:]  # killed after step 6: the step-4 checkpoint
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))

    records = read_sample_records(run_dir)
    attempts = {r["attempt"] for recs in records.values() for r in recs}
    assert attempts == {0, 1}  # steps up to the checkpoint from the killed attempt, the rest replayed
    with open(os.path.join(run_dir, "samples", "rank-00000.jsonl")) as f:
        replayed = [json.loads(line)["step"] for line in f]
    assert len(replayed) > len(set(replayed))  # the killed attempt had run steps past its checkpoint
    order = SampleOrder(Manifest.load(uneven).split("train"), windows=4, seed=1234, block_shards=4)
    assert sorted(records) == list(range(1, 31))
    used = []
    for step, recs in sorted(records.items()):
        assert [r["rank"] for r in recs] == [0, 1] and len(recs[0]["samples"]) == len(recs[1]["samples"]) == 4
        positions = recs[0]["positions"] + recs[1]["positions"]
        assert positions == list(range((step - 1) * 8, step * 8))
        used += recs[0]["samples"] + recs[1]["samples"]
    assert used == order.samples_at(np.arange(240)).tolist()
    # Exactly once per epoch (160 samples per epoch; 240 = one epoch and a half).
    assert sorted(used[:160]) == list(range(160))
    assert len(set(used[160:])) == 80
    # Same samples as the uninterrupted run, step by step, from the loader's own record.
    ref = read_sample_records(reference)
    assert {s: [r["samples"] for r in recs] for s, recs in records.items()} == \
           {s: [r["samples"] for r in recs] for s, recs in ref.items()}


def test_uneven_shards_every_rank_runs_every_step(reference):
    # The reference run read shards of 1 to 25 rows: both ranks did all 30 steps with 4 samples each, and it ended
    # (run_to_end has a timeout, so a rank stuck in a ZeRO-3 collective would fail it instead of hanging).
    records = read_sample_records(reference)
    assert sorted(records) == list(range(1, 31))
    assert all([len(r["samples"]) for r in recs] == [4, 4] for recs in records.values())
    with open(os.path.join(reference, "summary.json")) as f:
        summary = json.load(f)
    assert summary["step"] == 30 and summary["world_size"] == 2 and summary["exit_code"] == 0
    assert summary["config"] == "tiny" and "mfu" not in summary  # CPU: no peak, so no MFU (the header says why)
    with open(os.path.join(reference, "metrics.jsonl")) as f:
        assert not [r for r in map(json.loads, f) if "mfu" in r]


def test_ctrl_c_checkpoints_quietly_and_resume_on_one_process_continues_the_same_order(reference, preempted):
    run_dir, stopped_at, out, rc = preempted
    assert rc == 130 and 5 <= stopped_at < 24  # a preempted run must not look like a finished one to make/schedulers
    interrupted = out[: out.index("summary:")]
    # Our one line, once (rank 0), and none of torchrun's SignalException / ChildFailedError noise.
    assert interrupted.count("stopping on signal SIGINT: checkpoint saved at step") == 1, interrupted[-3000:]
    for noise in ("Traceback", "SignalException", "ChildFailedError", "KeyboardInterrupt", "OMP_NUM_THREADS"):
        assert noise not in out, out[-5000:]
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', ckpt.tag_for(stopped_at))}_universal" in out
    records, ref = read_sample_records(run_dir), read_sample_records(reference)
    for step in range(stopped_at + 1, 31):
        (single,) = records[step]
        assert single["world"] == 1
        assert single["samples"] == ref[step][0]["samples"] + ref[step][1]["samples"]
    for step in range(1, stopped_at + 1):
        assert [r["world"] for r in records[step]] == [2, 2]
    # 2 -> 1 with the global batch kept by accumulation is bitwise equal here (the universal-load fixes in
    # trainer/resume.py are what make it so; without them the weights drift by ~1e-3).
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))


def test_resume_on_more_processes_outlasts_the_collective_timeout_while_converting(reference, preempted, uneven,
                                                                                  tmp_path):
    """1 -> 2 processes. Rank 0 converts the checkpoint before the process group exists while rank 1 polls for the
    result, so a conversion slower than the training collective timeout (here 10 s against 4 s) cannot time out;
    the timeout is in force once training runs (test_collective_timeout_is_long_in_start_up_short_in_training)."""
    source, _, _, _ = preempted
    run_dir = str(tmp_path / "widened")
    shutil.copytree(source, run_dir)
    root = ckpt.checkpoints_dir(run_dir)
    for tag in ("global_step28", "global_step30"):
        shutil.rmtree(os.path.join(root, tag))
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write("global_step24")
    assert ckpt.read_state(root, "global_step24")["world_size"] == 1
    out = run_to_end(torchrun(2, uneven, run_dir, *RESUME, "distributed.collective_timeout_s=4"),
                     env={"JPEGLM_CONVERT_DELAY_S": "10"}).stdout
    converted = re.search(r"converted global_step24 in ([\d.]+) s", out)
    assert converted and float(converted.group(1)) >= 10, out[-3000:]
    assert "collective timeout: 4 s while training (7200 s during start-up)" in out
    assert f"resumed from {os.path.join(root, 'global_step24_universal')} at step 24" in out
    records, ref = read_sample_records(run_dir), read_sample_records(reference)
    for step in range(25, 31):
        assert [r["world"] for r in records[step]] == [2, 2]
        assert [r["samples"] for r in records[step]] == [r["samples"] for r in ref[step]]
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
    # A launcher's `jpeglm checkpoint convert` before the next start on 2 processes: nothing to do now.
    from jpeglm.cli import main

    assert main(["checkpoint", "convert", run_dir, "--world-size", "2"]) == 0


def test_collective_timeout_is_long_in_start_up_short_in_training(tmp_path):
    """trainer.distributed: the group starts under distributed.startup_timeout_s (a rank 4 s late is fine under
    60 s), then set_collective_timeout(2) makes a collective that waits 6 s for a peer fail on gloo."""
    script = tmp_path / "pg.py"
    script.write_text("""
import sys, time
import torch, torch.distributed as dist
from trainer.distributed import init_deepspeed, set_collective_timeout
init_deepspeed("cpu", timeout_s=60)
rank = dist.get_rank()
if rank == 0:
    time.sleep(4)
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank {rank}: start-up all_reduce {t.item():g}", flush=True)
set_collective_timeout(2)
if rank == 0:
    time.sleep(6)
    sys.exit(0)
try:
    dist.all_reduce(t)
    print("rank 1: no timeout", flush=True)
except Exception as e:
    print(f"rank 1: {type(e).__name__}: {e}", flush=True)
""")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert "rank 0: start-up all_reduce 2" in outs[0] and "rank 1: start-up all_reduce 2" in outs[1], outs
    assert "rank 1: RuntimeError" in outs[1] and "Timed out" in outs[1] and "2000ms" in outs[1], outs[1][-2000:]


def test_rerunning_a_finished_run_changes_nothing_and_shows_its_summary(reference, uneven):
    files = ("summary.json", "metrics.jsonl", "attempts.jsonl", "loss.png")
    before = {name: open(os.path.join(reference, name), "rb").read() for name in files}
    out = run_to_end(torchrun(2, uneven, reference, *RESUME, "checkpoint.keep_last=10",
                              launcher="trainer.launch")).stdout
    assert out.count("is already finished: step 30 of train.max_steps=30") == 1, out[-3000:]
    assert json.loads(out[out.index("{"):]) == json.loads(before["summary.json"])
    assert {name: open(os.path.join(reference, name), "rb").read() for name in files} == before


def test_checkpoints_are_kept_complete_and_pruned(killed):
    run_dir, _ = killed
    root = ckpt.checkpoints_dir(run_dir)
    tags = ckpt.complete_tags(root)
    assert tags == ["global_step24", "global_step28", "global_step30"]  # keep_last=3 (30 = the final save)
    assert ckpt.latest_tag(root) == "global_step30"
    assert not [n for n in os.listdir(root) if n.startswith("global_step") and n not in tags]
    state = ckpt.read_state(root, "global_step30")
    assert state["loader"]["consumed"] == 240 and state["world_size"] == 2
    assert state["codec"] == Manifest.load(state["data"]["uri"]).raw["codec"]  # image size + quality, for export
    assert os.path.isfile(os.path.join(root, "global_step30", ckpt.TOKENIZER_FILE))


def test_tiny_model_learns_below_the_unigram_entropy(dataset, tmp_path):
    """On real JPEG tokens, a model that learned nothing beyond token frequencies cannot beat the unigram
    entropy of the validation tokens; the trained model must, by a wide margin (the estimate's standard error on
    ~20k tokens is ~0.015 nats)."""
    manifest = Manifest.load(dataset)
    tokens = []
    for shard in manifest.split("validation"):
        for row, valid in read_rows(shard, manifest.seq_len).values():
            tokens.append(row[1:valid])  # the targets: every token after a row's first
    counts = np.bincount(np.concatenate(tokens), minlength=320)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    assert 5.0 < unigram_entropy < np.log(320)  # JPEG bytes are already compressed: close to uniform

    run_dir = str(tmp_path / "learn")
    run_to_end(torchrun(2, dataset, run_dir, *SMALL, "train.micro_batch_size=8", "train.global_batch_size=16",
                        "train.max_steps=150", "optimizer.lr=1e-2", "optimizer.warmup_steps=10",
                        "eval.every_steps=50", "eval.max_samples=80", "checkpoint.every_steps=1000"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        val = [r for r in map(json.loads, f) if r["kind"] == "validation"]
    assert [r["step"] for r in val] == [50, 100, 150]
    assert val[-1]["loss"] < unigram_entropy - 0.2, (val, unigram_entropy)
    assert val[-1]["loss"] < val[0]["loss"]
    assert 0 < val[-1]["bits_per_byte"] < 8
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["validation_loss"] == val[-1]["loss"]
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 1000


def test_resuming_onto_data_of_another_tokenizer_is_refused(reference, uneven, tmp_path, capsys):
    """The run's tokenizer fingerprint is in its checkpoints: the same token ids from another tokenizer would be
    other bytes. Refused before any process starts, and the run dir is left as it was."""
    from jpeglm.cli import main
    from pipeline.tokenizer import Tokenizer

    other = tmp_path / "retokenized"
    other.mkdir()
    os.symlink(os.path.join(uneven, "shards"), other / "shards")
    rng = np.random.default_rng(1)
    tokenizer = Tokenizer.train([rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() for _ in range(20)])
    tokenizer.save(str(other / "tokenizer.model"))
    with open(os.path.join(uneven, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["tokenizer"]["fingerprint"] = tokenizer.fingerprint
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(os.listdir(reference)), open(os.path.join(reference, "attempts.jsonl")).read()

    assert main(["train", "--config", "tiny", "--data", str(other), "--run-dir", reference, *RESUME]) == 2
    err = capsys.readouterr().err
    run_fp = Manifest.load(uneven).fingerprint
    assert "refusing to resume" in err and run_fp[:12] in err and tokenizer.fingerprint[:12] in err
    other_model = [*RESUME, "model.n_layers=3"]
    assert main(["train", "--config", "tiny", "--data", uneven, "--run-dir", reference, *other_model]) == 2
    assert "model config differs" in capsys.readouterr().err
    assert (sorted(os.listdir(reference)), open(os.path.join(reference, "attempts.jsonl")).read()) == before


def test_padding_only_micro_batches_leave_the_weights_finite(dataset, tmp_path):
    """A split's last row is padded past valid_tokens, so with short windows its later windows hold no target at
    all. Such a micro-batch must contribute nothing, not a 0/0 = NaN loss whose gradient poisons every weight."""
    from helpers import write_dataset

    real = Manifest.load(dataset)
    windows = real.seq_len // 256
    root = str(tmp_path / "padded")
    write_dataset(root, {"train": [1], "validation": [1]}, row_len=real.seq_len, last_valid=100,
                  fingerprint=real.fingerprint)
    shutil.copyfile(os.path.join(dataset, "tokenizer.model"), os.path.join(root, "tokenizer.model"))
    run_dir = str(tmp_path / "run")
    run_to_end([sys.executable, "-m", "trainer.train", "--config", "tiny", "--data", root, "--run-dir", run_dir,
                *SMALL, "train.micro_batch_size=1", "train.global_batch_size=1", f"train.max_steps={windows}",
                "eval.every_steps=0", "checkpoint.every_steps=1000"])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert len(losses) == windows and windows > 1
    assert sum(np.isnan(losses)) == windows - 1  # every window after the first is padding only
    assert all(bool(np.isfinite(w.numpy()).all()) for w in final_weights(run_dir).values())


def _hf_folder(path: str, tokenizer_path: str, seed: int) -> dict:
    """A Hugging Face Llama folder (as `jpeglm export --format hf` or the authors' release) of a small random
    model; returns its weights under our parameter names."""
    import torch

    from trainer.hf import save_hf
    from trainer.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, ffn_dim=176, max_seq_len=512)
    state = {k: v.clone() for k, v in Transformer(cfg).state_dict().items()}
    save_hf(state, cfg, path, tokenizer_path)
    return state


def test_init_from_a_hugging_face_folder_loads_its_weights_into_zero3(dataset, tmp_path):
    """Fine-tuning starts from the checkpoint's exact weights (scattered into every rank's ZeRO-3 partition) and
    its shape (grouped-query attention here, unlike the preset), not from the preset's random init."""
    hf_dir = str(tmp_path / "hf")
    expected = _hf_folder(hf_dir, os.path.join(dataset, "tokenizer.model"), seed=7)
    run_dir = str(tmp_path / "finetune")
    run_to_end(torchrun(2, dataset, run_dir, "--init-from", hf_dir, *SMALL, "train.max_steps=0",
                        "eval.every_steps=0"))
    got = final_weights(run_dir)
    assert_bitwise_equal(got, {k: v.float() for k, v in expected.items()})
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert f"init_from: {hf_dir}" in f.read()


def test_init_from_a_model_of_another_tokenizer_is_refused(dataset, tmp_path, capsys):
    from jpeglm import cli
    from pipeline.codec import canonicalize
    from pipeline.sample_images import derive
    from pipeline.tokenizer import Tokenizer

    other = Tokenizer.train([canonicalize(d) for _, d in derive(8, seed=3)], vocab_size=320)
    other_path = str(tmp_path / "other.model")
    other.save(other_path)
    hf_dir = str(tmp_path / "hf")
    _hf_folder(hf_dir, other_path, seed=7)
    rc = cli.main(["train", "--config", "tiny", "--data", dataset, "--run-dir", str(tmp_path / "run"),
                   "--init-from", hf_dir, *SMALL])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trained with tokenizer" in err and f"preprocess with --tokenizer {hf_dir}/tokenizer.model" in err


def test_an_error_only_one_rank_hits_after_planning_is_printed_once(uneven, tmp_path):
    """A row only rank 1 reads in step 1 is corrupt (too short): planning passes on both ranks, then rank 1's
    DataError is printed once, with its rank, through `python -m trainer.launch`; no traceback, non-zero exit."""
    from helpers import write_dataset
    from trainer.data import TrainStream

    real = Manifest.load(uneven)
    first_rows = []
    for rank in (0, 1):  # RESUME: 8 samples per step, one micro-batch of 4 per rank, 256-token windows
        stream = TrainStream(real, 256, 1234, 8, 4, rank, 2, block_shards=4)
        try:
            first_rows.append({sid // stream.windows for sid in stream.next_batch().sample_ids})
        finally:
            stream.close()
    bad_row = min(first_rows[1] - first_rows[0])
    rows = {}
    for split in ("train", "validation"):
        for shard in real.split(split):
            for r, (tokens, valid) in read_rows(shard, real.seq_len).items():
                rows[(split, r)] = (tokens[:-1], valid - 1) if (split, r) == ("train", bad_row) else (tokens, valid)
    root = str(tmp_path / "corrupt")
    write_dataset(root, {"train": UNEVEN_SHARD_ROWS, "validation": [real.raw["totals"]["validation"]["rows"]]},
                  row_len=real.seq_len, fingerprint=real.fingerprint, rows_source=lambda split, i: rows[(split, i)])
    shutil.copyfile(os.path.join(uneven, "tokenizer.model"), os.path.join(root, "tokenizer.model"))
    cmd = torchrun(2, root, str(tmp_path / "run"), *RESUME, "train.max_steps=2", launcher="trainer.launch")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                          timeout=LAUNCH_TIMEOUT, start_new_session=True)
    out = proc.stdout
    assert proc.returncode != 0 and "Traceback" not in out, out[-5000:]
    errors = [line for line in out.splitlines() if "jpeglm train: error:" in line]
    assert len(errors) == 1 and "rank 1: " in errors[0] and "expected uint16 (1024,)" in errors[0], out[-5000:]
    assert "rank 0 stopped: another rank ended" in out  # its collective lost the peer: one line, no traceback
    assert "rank 1 ended with exit code 2" in out  # the launcher names the rank that failed


def test_a_refusal_every_rank_makes_is_printed_once_by_rank_0(tmp_path):
    """Planning reads the same files on every rank: rank 0 alone prints the refusal, the launch adds nothing."""
    cmd = torchrun(2, str(tmp_path / "no-such-data"), str(tmp_path / "run"), *RESUME, launcher="trainer.launch")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                          timeout=LAUNCH_TIMEOUT, start_new_session=True)
    errors = [line for line in proc.stdout.splitlines() if "jpeglm train: error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert len(errors) == 1 and "no manifest.json" in errors[0] and "error: rank" not in errors[0], proc.stdout[-3000:]
    assert "ended with" not in proc.stdout
