"""infra/, offline: every rendered Kubernetes object validates (core schemas strict; custom resources against the
upstream CRDs in ../shared/crds), the job commands are real `jpeglm` commands whose flags parse and carry the
overlay's parameters, the preemption/restart settings hold together, the sbatch scripts pass bash -n / shellcheck
and requeue on SIGTERM, the Dockerfiles lint clean, and the Terraform validates and plans least-privilege policies.

The checks themselves live in infra/tools/check.py (also behind `make -C infra ...-dry-run`); these tests run them
and show they catch what they claim to catch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _load_check():
    spec = importlib.util.spec_from_file_location("infra_check", INFRA / "tools" / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()
OVERLAYS = check.overlays()
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (renders the overlays)")


@pytest.fixture(scope="session")
def crds():
    d = check.crd_dir()
    if d is None:
        pytest.skip(f"CRD schemas not found at {check.crd_dir_candidate()} (../shared/crds beside the repository, "
                    "or $JPEGLM_CRD_DIR): custom resources cannot be validated offline")
    return d


@pytest.fixture(scope="session")
def rendered():
    """(env, job) -> (objects, problems, notes) for every overlay, rendered and checked once."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (renders the overlays)")
    return {(env, job): check.check_k8s(env, job) for env, job in OVERLAYS}


def _obj(objects, kind):
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _params(env):
    return check.read_params(INFRA / "k8s" / "overlays" / env / "env" / "params.env")


# ------------------------------------------------------------------------------------------- Kubernetes


def test_overlays_exist_for_both_jobs():
    envs = {env for env, _ in OVERLAYS}
    assert {"dev", "prod"} <= envs
    assert set(OVERLAYS) == {(env, job) for env in envs for job in check.JOBS}


@needs_kubectl
@pytest.mark.parametrize("env, job", OVERLAYS, ids=[f"{e}-{j}" for e, j in OVERLAYS])
def test_overlay_renders_and_passes_every_check(rendered, env, job):
    objects, problems, notes = rendered[env, job]
    for note in notes:
        print("note:", note)
    assert problems == []
    kinds = {o["kind"] for o in objects}
    assert {"RayJob", "ServiceAccount"} <= kinds if job == "preprocess" else {"PyTorchJob", "PersistentVolumeClaim"} <= kinds
    # No parameter ConfigMap leaks into what is applied (it is local-config, consumed by the replacements).
    assert "ConfigMap" not in kinds
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert len(namespaces) == 1 and None not in namespaces


def test_custom_resources_validate_against_upstream_crds(crds, rendered):
    validators = check.crd_validators(str(crds))
    for kind in ("RayJob", "PyTorchJob"):
        assert any(k == kind for _, k in validators), f"no CRD for {kind} in {crds}"
    validated = 0
    for (env, job), (objects, problems, _) in rendered.items():
        for obj in objects:
            if obj["kind"] in ("RayJob", "PyTorchJob"):
                errors = list(validators[obj["apiVersion"], obj["kind"]].iter_errors(obj))
                assert errors == [], f"{env}/{job}: {[e.message for e in errors]}"
                validated += 1
    assert validated == len(rendered)


def test_crd_validation_rejects_typos_and_wrong_types(crds, rendered):
    rayjob = _obj(rendered["dev", "preprocess"][0], "RayJob")
    pytorchjob = _obj(rendered["dev", "train"][0], "PyTorchJob")

    typo = json.loads(json.dumps(rayjob))
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    problems, _ = check.validate_object(typo, crds)
    assert any("shutdownAfterJobFinish" in p and "CRD schema" in p for p in problems), problems

    wrong_type = json.loads(json.dumps(rayjob))
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    problems, _ = check.validate_object(wrong_type, crds)
    assert any("workerGroupSpecs.0.maxReplicas" in p for p in problems), problems

    # A typo inside an embedded pod template is caught both by the CRD and as a core PodTemplate.
    bad_pod = json.loads(json.dumps(pytorchjob))
    bad_pod["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    problems, _ = check.validate_object(bad_pod, crds)
    assert any("CRD schema" in p and "imagePullPolicyy" in p for p in problems), problems
    assert any("core PodTemplate" in p and "imagePullPolicyy" in p for p in problems), problems


def test_core_validation_is_strict_for_every_supported_version():
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": False}
    problems = check.validate_core(sa)
    assert len(problems) == len(check.K8S_VERSIONS) and all("automountToken" in p for p in problems)
    sa["automountServiceAccountToken"] = sa.pop("automountToken")
    assert check.validate_core(sa) == []


@needs_kubectl
def test_missing_parameter_fails_the_render_naming_it(tmp_path):
    env, overlay = tmp_path / "env", tmp_path / "preprocess"
    env.mkdir(), overlay.mkdir()
    shutil.copy(INFRA / "k8s/overlays/dev/env/kustomization.yaml", env)
    params = _params("dev")
    del params["DATA_URI"]
    (env / "params.env").write_text("".join(f"{k}={v}\n" for k, v in params.items()))
    rel = lambda p: os.path.relpath(INFRA / "k8s" / p, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [rel("base/preprocess")], "components": ["../env", rel("components/preprocess-params")]}))
    with pytest.raises(check.CheckError, match="DATA_URI"):
        check.render(overlay)


def test_unfilled_placeholders_and_bad_flags_are_reported():
    assert check.placeholders({"a": ["x", {"b": "s3://__DATA_URI__/x"}]}) == {"DATA_URI"}
    job = {"kind": "RayJob", "spec": {"entrypoint": "jpeglm preprocess --input a --output b --shard-size lots"}}
    ((where, argv),) = check.manifest_commands(job)
    (problem,) = check.check_command(argv, through_shell=True)
    assert "--shard-size" in problem and "not a size" in problem
    unquotable = check.check_command(["jpeglm", "preprocess", "--input", "a b", "--output", "c"], through_shell=True)
    assert any("shell quoting" in p for p in unquotable)
    with pytest.raises(check.CheckError, match="not a jpeglm subcommand"):
        check.parse_jpeglm(["jpeglm", "preproces", "--input", "a"])


@needs_kubectl
@pytest.mark.parametrize("env", sorted({e for e, _ in OVERLAYS}))
def test_job_commands_carry_the_overlay_parameters(rendered, env):
    """The values in params.env end up as the flags of the commands that run (and preprocess writes what train reads)."""
    params = _params(env)
    rayjob = _obj(rendered[env, "preprocess"][0], "RayJob")
    ((_, argv),) = check.manifest_commands(rayjob)
    pre = check.parse_jpeglm(argv)
    assert pre.input == [params["INPUT_URI"]]
    assert pre.output == params["DATA_URI"]
    assert pre.address == "auto"  # the entrypoint runs on the head of the RayJob's own cluster
    assert pre.max_in_flight == int(params["MAX_IN_FLIGHT"])

    pytorchjob = _obj(rendered[env, "train"][0], "PyTorchJob")
    commands = check.manifest_commands(pytorchjob)
    assert len(commands) == 2  # Master and Worker run the same command
    assert commands[0][1] == commands[1][1]
    train = check.parse_jpeglm(commands[0][1])
    assert (train.config, train.data, train.run_dir, train.resume) == (
        params["PRESET"], params["DATA_URI"], params["RUN_DIR"], "auto")
    assert train.data == pre.output
    assert pytorchjob["spec"]["nprocPerNode"] == params["NPROC_PER_NODE"]


@needs_kubectl
@pytest.mark.parametrize("env", sorted({e for e, _ in OVERLAYS}))
def test_training_is_preemption_friendly(rendered, env):
    objects = rendered[env, "train"][0]
    job, pvc = _obj(objects, "PyTorchJob"), _obj(objects, "PersistentVolumeClaim")
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 3
    gpus = set()
    for role in ("Master", "Worker"):
        replica = job["spec"]["pytorchReplicaSpecs"][role]
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator injects its env into this container only
        argv = container["command"] + container["args"]
        assert argv[0] == "torchrun" and "--max-restarts=0" in argv
        # torchrun SIGKILLs the ranks --shutdown-timeout after forwarding SIGTERM (measured: 2 s too short for a
        # 5 s save, 15 s enough); the kubelet SIGKILLs at terminationGracePeriodSeconds: the ranks need both.
        (timeout,) = [int(a.split("=")[1]) for a in argv if a.startswith("--shutdown-timeout=")]
        assert 30 < timeout < pod["terminationGracePeriodSeconds"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        run_dir = argv[argv.index("--run-dir") + 1]
        (mount,) = [p for p in mounts if run_dir.startswith(p.rstrip("/") + "/")]
        assert mounts[mount]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        gpus.add(container["resources"].get("limits", {}).get("nvidia.com/gpu"))
    if env == "prod":
        assert gpus == {job["spec"]["nprocPerNode"]}
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # ranks on every node write checkpoint shards
    if env == "dev":
        assert gpus == {None}


@needs_kubectl
@pytest.mark.parametrize("env", sorted({e for e, _ in OVERLAYS}))
def test_preprocess_cluster_autoscales_and_reaches_s3(rendered, env):
    objects = rendered[env, "preprocess"][0]
    job, sa = _obj(objects, "RayJob"), _obj(objects, "ServiceAccount")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == check.constraint_pins("cpu")["ray"]
    (group,) = cluster["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > group["minReplicas"]
    for template in (cluster["headGroupSpec"]["template"], group["template"]):
        pod = template["spec"]
        assert pod["serviceAccountName"] == sa["metadata"]["name"]  # IRSA / Workload Identity
        container = pod["containers"][0]
        assert {"secretRef": {"name": "jpeglm-s3", "optional": True}} in container["envFrom"]  # or a Secret
        assert container["resources"]["requests"] == container["resources"]["limits"]  # Ray sizes itself from limits
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])


@needs_kubectl
def test_autoscaling_check_catches_a_queue_too_short_for_max_replicas(rendered):
    rayjob = _obj(rendered["prod", "preprocess"][0], "RayJob")
    assert check.autoscaling_problems(rayjob) == []
    bigger = json.loads(json.dumps(rayjob))
    bigger["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = 100  # 1,600 CPUs > 1,024 queued
    (problem,) = check.autoscaling_problems(bigger)
    assert "stops short of maxReplicas" in problem
    bigger["spec"]["entrypoint"] = bigger["spec"]["entrypoint"].split(" --max-in-flight")[0]
    (problem,) = check.autoscaling_problems(bigger)
    assert "no --max-in-flight" in problem


# ------------------------------------------------------------------------------------------------- Slurm


@pytest.mark.parametrize("job", check.JOBS)
def test_sbatch_scripts_pass_bash_n_shellcheck_and_flag_checks(job):
    problems, notes = check.check_slurm(job, check.read_params(INFRA / "slurm/params.example.env"))
    for note in notes:
        print("note:", note)  # e.g. shellcheck not installed
    assert problems == []


def test_sbatch_commands_use_the_params_and_report_missing_ones():
    params = check.read_params(INFRA / "slurm/params.example.env")
    # The conversion for another number of GPUs runs first, outside the process group (trainer/convert.py).
    (l1, convert, missing1), (l2, argv, missing) = check.sbatch_commands(
        INFRA / "slurm/train.sbatch", {**check.SLURM_RUNTIME_EXAMPLES, **params})
    assert not missing and not missing1 and l1 < l2
    assert check.parse_jpeglm(convert).run == params["RUN_DIR"] and convert[1:4] == ["checkpoint", "convert",
                                                                                    params["RUN_DIR"]]
    args = check.parse_jpeglm(argv)
    assert (args.config, args.data, args.run_dir, args.resume) == (params["PRESET"], params["DATA_URI"], params["RUN_DIR"], "auto")
    ((_, argv, _),) = check.sbatch_commands(INFRA / "slurm/preprocess.sbatch", {**check.SLURM_RUNTIME_EXAMPLES, **params})
    assert check.parse_jpeglm(argv).output == params["DATA_URI"]

    del params["DATA_URI"]
    problems, _ = check.check_slurm("train", params)
    assert any("DATA_URI" in p for p in problems), problems


def test_train_sbatch_requeues_with_resume_and_shuts_down_in_time():
    text = (INFRA / "slurm/train.sbatch").read_text()
    directives = [l.split(None, 1)[1] for l in text.splitlines() if l.startswith("#SBATCH")]
    (signal_lead,) = [int(d.split("@")[1]) for d in directives if d.startswith("--signal=B:TERM@")]
    assert "--requeue" in directives and "--open-mode=append" in directives
    (_, _, _), (_, argv, _) = check.sbatch_commands(INFRA / "slurm/train.sbatch",
                                                    check.read_params(INFRA / "slurm/params.example.env"))
    assert argv[argv.index("--resume") + 1] == "auto"
    (line,) = [l for l in check.logical_lines(text) if "torchrun" in l and "jpeglm" in l]
    (timeout,) = [int(w.split("=")[1]) for w in shlex.split(line) if w.startswith("--shutdown-timeout=")]
    assert timeout < signal_lead  # the ranks are done before Slurm's own kill at the time limit


def _fake_slurm(tmp_path, srun_exit: int):
    """Stand-ins for srun/scontrol (no Slurm here): srun records its argv, and on SIGTERM records it, spends 1 s
    "checkpointing" and exits 1 (as torchrun does after SIGTERM); scontrol answers hostnames and records requeues;
    jpeglm (the conversion the script runs before srun) records its argv in jpeglm.log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    (bin_dir / "jpeglm").write_text(f'#!/bin/bash\necho "jpeglm $*" >> {tmp_path}/jpeglm.log\n')
    (bin_dir / "srun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "srun $*" >> {log}
        trap 'echo "srun got TERM" >> {log}; sleep 1; exit 1' TERM
        for _ in $(seq 300); do [ -e {tmp_path}/finish ] && exit {srun_exit}; sleep 0.1; done
        exit 99
        """))
    (bin_dir / "scontrol").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        case "$1" in
          show) echo node001; echo node002 ;;
          requeue) echo "requeue $2" >> {log} ;;
        esac
        """))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[001-002]",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:8",
           "DATA_URI": "s3://b/shards/v1", "RUN_DIR": str(tmp_path / "run")}
    return env, log


def _start_train_sbatch(tmp_path, srun_exit):
    env, log = _fake_slurm(tmp_path, srun_exit)
    proc = subprocess.Popen(["bash", str(INFRA / "slurm/train.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert log.exists(), proc.communicate()[0]
    return proc, log


@pytest.mark.timeout(60)
def test_train_sbatch_forwards_sigterm_then_requeues(tmp_path):
    proc, log = _start_train_sbatch(tmp_path, srun_exit=0)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does: only the batch shell gets it
    out, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, out
    srun_argv = shlex.split(lines[0])
    assert "--nproc-per-node=8" in srun_argv and "--rdzv-endpoint=node001:29500" in srun_argv
    assert lines[1:] == ["srun got TERM", "requeue 4242"], lines  # the ranks stop before the requeue
    # Before srun: the checkpoint converted for this allocation's world size (2 nodes x 8 GPUs), if it needs it.
    assert (tmp_path / "jpeglm.log").read_text().splitlines() == [
        f"jpeglm checkpoint convert {tmp_path / 'run'} --world-size 16"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("srun_exit", [0, 3])
def test_train_sbatch_without_signal_exits_with_srun_status_and_no_requeue(tmp_path, srun_exit):
    proc, log = _start_train_sbatch(tmp_path, srun_exit=srun_exit)
    (tmp_path / "finish").touch()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == srun_exit, out
    assert not any("requeue" in l for l in log.read_text().splitlines())


# ------------------------------------------------------------------------------------------------ Docker


def test_dockerfiles_lint_clean():
    assert check.check_docker() == []


def test_dockerfile_lint_catches_breakage(tmp_path):
    good = (INFRA / "docker/Dockerfile.cpu").read_text()
    shutil.copy(INFRA / "docker/Dockerfile.cpu.dockerignore", tmp_path / "Dockerfile.cpu.dockerignore")
    broken = (good.replace("COPY trainer trainer", "COPY trainers trainers")
                  .replace('ENTRYPOINT ["jpeglm"]', 'ENTRYPOINT ["python"]')
                  .replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0")
                  .replace("USER 1000", "USER root")
                  .replace("python:${PYTHON_VERSION}-slim-bookworm AS build", "python AS build"))
    (tmp_path / "Dockerfile.cpu").write_text(broken)
    problems = "\n".join(check.check_dockerfile(tmp_path / "Dockerfile.cpu", "cpu"))
    for expected in ("COPY source trainers", "ENTRYPOINT", "TORCH_VERSION=2.12.0", "root", "python is not pinned"):
        assert expected in problems
    # An allowlist that forgets the bundled photos (package data) would ship an image without them.
    (tmp_path / "Dockerfile.cpu").write_text(good)
    with open(tmp_path / "Dockerfile.cpu.dockerignore", "a") as f:
        f.write("**/*.jpg\n")
    assert any("pipeline/photos/" in p for p in check.check_dockerfile(tmp_path / "Dockerfile.cpu", "cpu"))


def test_dockerignore_semantics():
    patterns = ["*", "!jpeglm/", "!pipeline/", "**/__pycache__"]
    assert not check.dockerignored("jpeglm/cli.py", patterns)
    assert not check.dockerignored("pipeline/photos/coins.jpg", patterns)
    assert check.dockerignored(".venv/bin/python", patterns)
    assert check.dockerignored("jpeglm/__pycache__/cli.cpython-311.pyc", patterns)


# --------------------------------------------------------------------------------------------- Terraform


def _allowed(policy: dict, action: str, resource: str, prefix: str | None = None) -> bool:
    """Does an identity policy allow this S3 request (Allow statements, wildcards, the s3:prefix condition)?"""
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] != "Allow" or not any(fnmatch(action, a) for a in actions):
            continue
        if not any(fnmatch(resource, r) for r in resources):
            continue
        prefixes = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if prefixes is not None and (prefix is None or not any(fnmatch(prefix, p) for p in prefixes)):
            continue
        return True
    return False


@pytest.fixture(scope="module")
def terraform_plan(tmp_path_factory):
    if shutil.which("terraform") is None:
        pytest.skip("terraform not installed: `terraform validate` skipped")
    plugin_dir = Path(os.environ.get("TF_PLUGIN_DIR", "/opt/tf-plugins"))
    if not plugin_dir.is_dir():
        pytest.skip(f"no offline AWS provider mirror at {plugin_dir} (set TF_PLUGIN_DIR): terraform init needs network")
    work = tmp_path_factory.mktemp("terraform")
    for f in (INFRA / "terraform").glob("*.tf"):
        shutil.copy(f, work)
    # Planning offline: fake credentials, no AWS API calls (nothing here reads remote state).
    (work / "zz_offline_override.tf").write_text(textwrap.dedent("""\
        provider "aws" {
          access_key                  = "offline"
          secret_key                  = "offline"
          skip_credentials_validation = true
          skip_requesting_account_id  = true
          skip_metadata_api_check     = true
        }
        """))
    (work / "empty.tfrc").write_text("")
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "TF_CLI_CONFIG_FILE": str(work / "empty.tfrc"), "CHECKPOINT_DISABLE": "1"}

    def tf(*args):
        proc = subprocess.run(["terraform", f"-chdir={work}", *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"terraform {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    tf("init", "-backend=false", "-input=false", f"-plugin-dir={plugin_dir}")
    return tf, work


def test_terraform_validates_and_is_formatted(terraform_plan):
    tf, _ = terraform_plan
    assert "Success" in tf("validate", "-no-color")
    proc = subprocess.run(["terraform", "fmt", "-check", "-diff", "-recursive", str(INFRA / "terraform")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_terraform_plan_grants_least_privilege(terraform_plan):
    tf, work = terraform_plan
    tf("plan", "-input=false", "-no-color", "-out=plan.bin", "-var", "bucket_name=jpeglm-test",
       "-var", 'preprocess_role_arns=["arn:aws:iam::123456789012:role/ml/jpeglm-preprocess"]',
       "-var", 'train_role_arns=["arn:aws:iam::123456789012:role/jpeglm-train"]')
    plan = json.loads(tf("show", "-json", "plan.bin"))
    resources = {r["address"]: r.get("values", {}) for r in plan["planned_values"]["root_module"]["resources"]}
    pre = json.loads(resources["aws_iam_policy.preprocess"]["policy"])
    train = json.loads(resources["aws_iam_policy.train"]["policy"])
    bucket, obj = "arn:aws:s3:::jpeglm-test", "arn:aws:s3:::jpeglm-test/{}".format

    assert _allowed(pre, "s3:GetObject", obj("raw/a/1.jpg"))
    assert _allowed(pre, "s3:PutObject", obj("shards/v1/shards/train-000000.tar"))
    assert _allowed(pre, "s3:AbortMultipartUpload", obj("shards/v1/shards/train-000000.tar"))
    assert _allowed(pre, "s3:ListBucket", bucket, prefix="raw/a/")
    assert not _allowed(pre, "s3:PutObject", obj("raw/a/1.jpg"))  # input is read-only
    assert not _allowed(pre, "s3:DeleteObject", obj("raw/a/1.jpg"))
    assert not _allowed(pre, "s3:GetObject", obj("other/x"))
    assert not _allowed(pre, "s3:ListBucket", bucket, prefix="other/")

    assert _allowed(train, "s3:GetObject", obj("shards/v1/manifest.json"))
    assert _allowed(train, "s3:ListBucket", bucket, prefix="shards/v1/")
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert not _allowed(train, action, obj("shards/v1/manifest.json"))
    assert not _allowed(train, "s3:GetObject", obj("raw/a/1.jpg"))

    rules = {r["id"]: r for r in resources["aws_s3_bucket_lifecycle_configuration.data"]["rule"]}
    assert rules["abort-incomplete-multipart-uploads"]["abort_incomplete_multipart_upload"][0]["days_after_initiation"] == 1
    assert resources["aws_s3_bucket_versioning.data"]["versioning_configuration"][0]["status"] == "Enabled"
    assert resources['aws_iam_role_policy_attachment.preprocess["arn:aws:iam::123456789012:role/ml/jpeglm-preprocess"]']["role"] == "jpeglm-preprocess"
    assert resources["aws_s3_bucket_public_access_block.data"]["restrict_public_buckets"] is True


# -------------------------------------------------------------------------------------------- make targets


@needs_kubectl
@pytest.mark.slow
def test_make_dry_runs_render_check_and_print_the_submit_command(tmp_path):
    def make(*args):
        proc = subprocess.run(["make", "-s", "-C", str(INFRA), *args, f"PYTHON={sys.executable}", f"BUILD={tmp_path}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = make("cluster-train-dry-run", "OVERLAY=prod")
    assert "ok: overlays/prod/train" in out and f"apply --server-side --field-manager=jpeglm -f {tmp_path}/train.yaml" in out
    applied = list(yaml.safe_load_all((tmp_path / "train.yaml").read_text()))
    assert {o["kind"] for o in applied} == {"ServiceAccount", "PersistentVolumeClaim", "PyTorchJob"}
    out = make("cluster-preprocess-dry-run", "SCHEDULER=slurm")
    assert "runs: jpeglm preprocess --address" in out and f"sbatch {INFRA}/slurm/preprocess.sbatch" in out
    # The real target refuses the placeholder image tag of the committed overlays before touching a cluster.
    proc = subprocess.run(["make", "-s", "-C", str(INFRA), "cluster-preprocess", f"PYTHON={sys.executable}",
                           f"BUILD={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "placeholder tag" in proc.stderr
