"""Failures of the environment in the middle of a preprocess job, made real on this machine: a full disk (a tmpfs
with size=), a read-only bind mount, a folder without permission (a process run as `nobody`), S3 answering
AccessDenied (the loopback proxy in front of moto), a missing bucket, and a worker node whose raylet is killed.

Each says what failed, where and what to do in one line, exits 1, prints no traceback and is not retried; after
the fix, the same command resumes and writes the bytes of an undisturbed run. Lost nodes are retried elsewhere and
said in one line, without Ray's own output on the terminal. Mounting needs root: those tests skip without it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jpeglm.devtools.s3proxy import S3Proxy
from pipeline import environment, storage
from pipeline.preprocess import failures
from pipeline.preprocess.faults import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs or a read-only bind mount needs root")
# 8 images per unit, small rows and shards: a few units, buckets and shards from the 60 bundled-photo images
ARGS = ["--seq-len", "1024", "--images-per-unit", "8", "--shard-size", "200KB", "--val-fraction", "0.2",
        "--bpe-sample", "40", "--images-per-bucket", "3000", "--num-cpus", "2"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path):
    """path itself, read-only (a bind mount of it over itself)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on folder's filesystem."""
    ballast = folder / "ballast"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def preprocess(inputs: str, output: str, *extra: str, env_extra: dict | None = None,
               timeout: float = 400) -> tuple[int, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "jpeglm", "preprocess", "--input", inputs, "--output", output,
                           *ARGS, *extra], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)
    return proc.returncode, proc.stdout.decode(errors="replace")


def data_files(output: str) -> dict[str, bytes]:
    names = ["manifest.json", "tokenizer.model"]
    names += [f"shards/{n}" for n in storage.listdir(storage.join(output, "shards"))]
    names += [f"stats/{n}" for n in storage.listdir(storage.join(output, "stats"))]
    return {n: storage.read_bytes(storage.join(output, n)) for n in names}


def assert_one_clear_line(text: str, *needles: str) -> str:
    """The output holds exactly one error line, with all needles, and nothing of Python's or Ray's internals."""
    assert "Traceback" not in text and "(raylet)" not in text and "ray::" not in text, text[-4000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text[-4000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def undisturbed(sample_image_dir, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    out = str(tmp_path_factory.mktemp("undisturbed") / "out")
    rc, text = preprocess(str(sample_image_dir), out)
    assert rc == 0, text[-3000:]
    assert "task_retries" in json.loads(Path(out, "summary.json").read_text())
    return out, data_files(out)


# ---------------------------------------------------------------------------------------------------------------
# classification where the error is raised (no Ray)


@needs_root
def test_a_full_disk_is_named_with_the_file_it_hit(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as small:
        target = str(small / "sub" / "big.bin")
        with pytest.raises(OSError) as info:
            storage.write_bytes(target, b"x" * 200_000)
        problem = environment.problem_of(info.value)
        assert problem.kind == environment.NO_SPACE and problem.path == target
        assert problem.line() == f"no space left on the device ({target}): free space on that filesystem, or " \
                                 "choose another --output"
        assert [p.name for p in (small / "sub").iterdir()] == []  # the temporary is gone


@needs_root
def test_a_read_only_filesystem_is_named(tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro") as ro:
        with pytest.raises(OSError) as info:
            storage.write_bytes(str(ro / "a.json"), b"{}")
    problem = environment.problem_of(info.value)
    assert (problem.kind, problem.path) == (environment.READ_ONLY, str(tmp_path / "ro" / "a.json"))


_WRITE_AS_NOBODY = """
import os, sys, tempfile
from pipeline import environment, storage
storage.write_bytes(os.path.join(tempfile.mkdtemp(), "warm-up"), b"x")  # imports everything while still root
os.setuid(65534)
try:
    storage.write_bytes(sys.argv[1], b"x")
except OSError as e:
    p = environment.problem_of(e)
    print(p.kind, p.path)
"""


@needs_root
def test_a_folder_without_permission_is_named():
    """Root may write anywhere: the write runs as `nobody` (after the imports: the interpreter lives under
    /root) into a folder only root may write."""
    folder = tempfile.mkdtemp(prefix="jpeglm-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        target = os.path.join(folder, "x.bin")
        out = subprocess.run([sys.executable, "-c", _WRITE_AS_NOBODY, target], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.stdout.split() == [environment.NO_PERMISSION, target], out.stderr[-2000:]
    finally:
        os.rmdir(folder)


def test_s3_access_denied_and_a_missing_bucket_are_named(s3_endpoint, s3_bucket, monkeypatch):
    bucket = s3_bucket.removeprefix("s3://")
    with S3Proxy(s3_endpoint, deny_writes=f"/{bucket}/denied/") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage.reset_s3()
        try:
            storage.write_bytes(f"{s3_bucket}/allowed/a", b"x")
            with pytest.raises(OSError) as info:
                storage.write_bytes(f"{s3_bucket}/denied/a", b"x")
            with pytest.raises(OSError) as missing:
                storage.write_bytes("s3://no-such-bucket-jpeglm/a", b"x")
        finally:
            storage.reset_s3()
    assert proxy.stats()["faults"] == 1  # asked once: a denial is never retried
    denied = environment.problem_of(info.value)
    assert (denied.kind, denied.path) == (environment.ACCESS_DENIED, f"{s3_bucket}/denied/a")
    assert environment.problem_of(missing.value).kind == environment.NO_BUCKET


def test_a_guarded_task_retries_only_transient_errors(monkeypatch):
    monkeypatch.setattr(failures, "TASK_RETRY_PAUSE_S", 0.0)
    calls = []

    def full_disk():
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device", "/out/x.bin")

    outcome = failures.guarded(full_disk)()
    assert len(calls) == 1 and outcome.retries == {}
    assert outcome.failure.problem.kind == environment.NO_SPACE and outcome.failure.problem.path == "/out/x.bin"

    flaky = iter([ConnectionResetError(errno.ECONNRESET, "reset"), None])

    def once_flaky():
        error = next(flaky)
        if error:
            raise error
        return 7

    assert failures.guarded(once_flaky)() == failures.Outcome(value=7, retries={"connection": 1})

    calls.clear()

    def always_down():
        calls.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    outcome = failures.guarded(always_down)()
    assert len(calls) == failures.TASK_EXCEPTION_RETRIES + 1
    assert outcome.retries == {"connection": failures.TASK_EXCEPTION_RETRIES}
    assert outcome.failure.problem is None and "ConnectionRefusedError" in outcome.failure.error


def test_out_of_memory_names_the_knobs_and_the_declared_memory():
    import ray

    line = str(failures.ray_error("encode (units)", 3, ray.exceptions.OutOfMemoryError("Task was killed"), 3 * 2**30,
                                  3, "/tmp/x.log"))
    assert "memory monitor" in line and "3.00 GiB" in line and "--images-per-unit" in line
    assert "--max-in-flight" in line and "\n" not in line
    line = str(failures.ray_error("encode (units)", 3, ray.exceptions.WorkerCrashedError(), 2**30, 3, None))
    assert "OOM killer" in line and "1.00 GiB" in line and "4 times" in line


# ---------------------------------------------------------------------------------------------------------------
# whole jobs (slow)


@pytest.mark.slow
@needs_root
def test_output_disk_full_stops_in_one_line_then_resumes_to_the_same_bytes(sample_image_dir, undisturbed, tmp_path):
    _, clean = undisturbed
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        # room for the plan and the tokenizer, not for every unit's encoded file
        ballast = fill(disk, leave=160 * 1024)
        rc, text = preprocess(str(sample_image_dir), str(out))
        assert rc == 1, text[-4000:]
        line = assert_one_clear_line(text, "no space left on the device", str(out),
                                     "free space on that filesystem, or choose another --output",
                                     "rerunning the same command resumes")
        assert "failed 4 times" not in text and "ran again" not in text  # not retried
        print(line)
        ballast.unlink()  # the user frees space and runs the same command
        rc, text = preprocess(str(sample_image_dir), str(out))
        assert rc == 0, text[-4000:]
        assert "resuming the unfinished job" in text
        assert data_files(str(out)) == clean


@pytest.mark.slow
def test_s3_access_denied_stops_in_one_line_then_resumes_to_the_same_bytes(sample_image_dir, undisturbed,
                                                                          s3_endpoint, s3_bucket):
    _, clean = undisturbed
    bucket = s3_bucket.removeprefix("s3://")
    with S3Proxy(s3_endpoint, deny_writes=f"/{bucket}/out/_work/encoded/") as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint}
        rc, text = preprocess(str(sample_image_dir), f"{s3_bucket}/out", env_extra=env)
        assert rc == 1, text[-4000:]
        assert_one_clear_line(text, "S3 denied access", f"{s3_bucket}/out/_work/encoded/",
                              "choose another --output", "rerunning the same command resumes")
        denied = proxy.stats()["faults"]
        assert 1 <= denied <= 4  # at most the tasks in flight, each asked once
        proxy.deny_writes = None  # the policy is fixed
        rc, text = preprocess(str(sample_image_dir), f"{s3_bucket}/out", env_extra=env)
        assert rc == 0, text[-4000:]
    assert data_files(f"{s3_bucket}/out") == clean


@pytest.mark.slow
@pytest.mark.distributed
def test_a_lost_node_is_one_line_and_the_bytes_are_unchanged(sample_image_dir, undisturbed, tmp_path):
    """Units 0 and 1 pause on their first attempt (one per node: each node has one CPU); the worker node's raylet
    is killed meanwhile, so its task is retried on the head node."""
    import time

    from jpeglm.devtools.local_cluster import two_node_cluster

    _, clean = undisturbed
    out = tmp_path / "out"
    with two_node_cluster(env={FAULT_ENV: "encode:0:slow,encode:1:slow"}) as cluster:  # the tasks' environment
        env = {**cluster.env(), "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "jpeglm", "preprocess", "--input", str(sample_image_dir),
                                 "--output", str(out), *ARGS], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        markers = [out / "_work" / "faults" / f"encode-{i}" for i in (0, 1)]
        deadline = time.monotonic() + 240
        while not all(m.exists() for m in markers) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert all(m.exists() for m in markers), proc.communicate()[0].decode()[-4000:]
        os.kill(cluster.worker_raylet(), 9)
        text = proc.communicate(timeout=400)[0].decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text and "(raylet)" not in text and "state-dump" not in text, text[-4000:]
    lost = [line for line in text.splitlines() if "lost node " in line]
    assert len(lost) == 1 and "retried elsewhere" in lost[0], text[-4000:]
    retries = json.loads((out / "summary.json").read_text())["task_retries"]
    assert retries.get("node_lost", 0) >= 1, retries
    assert data_files(str(out)) == clean


@pytest.mark.slow
def test_a_task_killed_by_rays_memory_monitor_names_the_knobs(sample_image_dir, tmp_path):
    """Ray's memory monitor, made to see every node as full (a kill threshold of 1% of the memory), kills the first
    task twice (once retried): one line with the declared memory and the knobs, no Ray output on the terminal."""
    oom = {"RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100", "RAY_task_oom_retries": "1"}
    rc, text = preprocess(str(sample_image_dir), str(tmp_path / "out"), env_extra=oom, timeout=240)
    assert rc == 1, text[-4000:]
    assert_one_clear_line(text, "killed by Ray's memory monitor", "the task declared", "--images-per-unit",
                          "--max-in-flight", "rerunning the same command resumes")
    assert "Refer to the documentation" not in text  # Ray's own explanation went to the log file


@pytest.mark.slow
def test_rays_forwarded_output_goes_to_the_log_file_and_back_with_verbose(tmp_path, capfd):
    """A task's print reaches the driver through Ray's log forwarding: into the log file by default, on the
    terminal again after restore() (what --verbose leaves alone)."""
    import time

    import ray

    from pipeline.preprocess.ray_output import RayLog, Routing

    def _say(text: str) -> str:  # local: pickled by value (a test module is not importable in a worker)
        print(text)
        return text

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
    try:
        sink = RayLog(str(tmp_path / "ray.log"))
        routing = Routing(sink).start()
        say = ray.remote(_say)
        assert ray.get(say.remote("routed-line")) == "routed-line"
        deadline = time.monotonic() + 30
        while sink.written() is None or "routed-line" not in Path(sink.path).read_text():
            assert time.monotonic() < deadline, "the task's line never reached the log file"
            time.sleep(0.2)
        routing.restore()
        ray.get(say.remote("terminal-line"))
        deadline = time.monotonic() + 30
        seen = ""
        while "terminal-line" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen += capfd.readouterr().out
        assert "terminal-line" in seen and "routed-line" not in seen
    finally:
        ray.shutdown()
