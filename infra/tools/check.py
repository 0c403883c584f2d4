"""Offline checks of everything under infra/: render and validate the Kubernetes manifests, check the Slurm
scripts and lint the Dockerfiles. Used by `make -C infra ...-dry-run` / `make -C infra lint` and by
tests/test_infra.py, so what CI checks is exactly what an operator's dry run checks.

Kubernetes: `kubectl kustomize` renders an overlay; core objects are validated with kubernetes-validate
(--strict: unknown fields are errors) for the oldest and newest Kubernetes versions we support; custom resources
(RayJob, PyTorchJob, ...) against the upstream CRD schemas in ../shared/crds (made strict the way the API server's
field validation is: a field a schema does not declare is an error, not silently pruned); the pod templates
embedded in custom resources are also validated as core PodTemplates. Every `jpeglm ...` command found in a
manifest or sbatch script is parsed with the real `jpeglm` argument parser.

    python infra/tools/check.py k8s preprocess --overlay dev [--out FILE] [--for-apply]
    python infra/tools/check.py slurm train --params infra/slurm/params.example.env
    python infra/tools/check.py docker
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

# libyaml's loader: the CRD files are up to 1.4 MB, ~10x slower to parse with the pure-Python one.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
JOBS = ("preprocess", "train")
# Oldest Kubernetes minor we support and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.37")
# A parameter a kustomize replacement failed to fill (see k8s/components/*-params).
PLACEHOLDER = re.compile(r"__([A-Z][A-Z0-9_]*)__")
# Image tags in the committed overlays before anyone has built an image (see `make -C infra images`).
PLACEHOLDER_TAG = re.compile(r":0{7,}-")


class CheckError(Exception):
    """A check could not run at all (missing tool, render failure)."""


# ----------------------------------------------------------------------------------------------- rendering


def kubectl() -> str:
    exe = shutil.which(os.environ.get("KUBECTL", "kubectl"))
    if exe is None:
        raise CheckError("kubectl not found on PATH (needed for `kubectl kustomize`; set KUBECTL to override)")
    return exe


def overlay_dir(env: str, job: str) -> Path:
    return K8S / "overlays" / env / job


def overlays() -> list[tuple[str, str]]:
    """(env, job) for every overlay directory in the tree."""
    return sorted(
        (p.parent.name, p.name)
        for p in (K8S / "overlays").glob("*/*")
        if p.name in JOBS and (p / "kustomization.yaml").is_file()
    )


def render(path: Path) -> tuple[str, list[dict]]:
    """`kubectl kustomize PATH`: the YAML text and its objects."""
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
    return proc.stdout, [d for d in yaml.load_all(proc.stdout, Loader=YAML_LOADER) if d]


def read_params(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the params.env format of the overlays and of infra/slurm)."""
    params = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise CheckError(f"{path}: not KEY=VALUE: {line!r}")
            params[key.strip()] = value.strip()
    return params


def constraint_pins(flavor: str = "cpu") -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / f"{flavor}.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


# ------------------------------------------------------------------------------------- schema validation


def crd_dir_candidate() -> Path:
    """$JPEGLM_CRD_DIR, else ../shared/crds beside the repository (CI's layout)."""
    return Path(os.environ.get("JPEGLM_CRD_DIR") or ROOT.parent / "shared" / "crds")


def crd_dir() -> Path | None:
    d = crd_dir_candidate()
    return d if d.is_dir() else None


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema (draft 4), with unknown fields rejected.

    The API server prunes fields a CRD schema does not declare (or rejects them under strict field validation);
    either way a typo'd field would silently do nothing, so here it is an error. Objects marked
    x-kubernetes-preserve-unknown-fields or with additionalProperties keep accepting anything.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("type", None)
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validators(directory: str) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a jsonschema validator, for every served version of every CRD in directory."""
    import jsonschema

    validators = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            # Root metadata is the API server's (ObjectMeta), validated separately against the core schema.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            schema = _strict(schema)
            schema["properties"]["metadata"] = {"type": "object"}
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return validators


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(root)"


def validate_core(obj: dict, versions=K8S_VERSIONS) -> list[str]:
    import kubernetes_validate

    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return [f"no Kubernetes {version} schema for {obj.get('apiVersion')} {obj.get('kind')}"]
        except kubernetes_validate.ValidationError as e:
            problems.append(f"Kubernetes {version}: {_where(e.path)}: {e.message}")
    return problems


def pod_templates(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every embedded PodTemplateSpec: a mapping whose `spec` has `containers`."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield path, node
            return
        for k, v in node.items():
            yield from pod_templates(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from pod_templates(v, path + (i,))


def validate_object(obj: dict, crds: Path | None, versions=K8S_VERSIONS) -> tuple[list[str], list[str]]:
    """(problems, notes) for one rendered object."""
    problems, notes = [], []
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    group = api_version.split("/")[0] if "/" in api_version else ""
    # Built-in groups are "" (core) and *.k8s.io; *.x-k8s.io (JobSet, Kueue) are CRDs like any other domain.
    if "." in group and (not group.endswith(".k8s.io") or group.endswith(".x-k8s.io")):
        if crds is None:
            notes.append(f"{kind}: no CRD schemas at {crd_dir_candidate()}: its schema check was skipped")
        else:
            validator = crd_validators(str(crds)).get((api_version, kind))
            if validator is None:
                problems.append(f"no CRD schema for {api_version} {kind} in {crds}")
            else:
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
                    problems.append(f"CRD schema: {_where(e.path)}: {e.message}")
        # The parts the API server validates for every object: ObjectMeta, and pod templates as core PodTemplates.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
        problems += [f"metadata: {p}" for p in validate_core(meta, versions)]
        for path, template in pod_templates(obj.get("spec", {}), ("spec",)):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"}, "template": template}
            problems += [f"{_where(path)} (as a core PodTemplate): {p}" for p in validate_core(wrapped, versions)]
    else:
        problems += validate_core(obj, versions)
    return problems, notes


# ------------------------------------------------------------------------------------ jpeglm invocations

_SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}


def jpeglm_argv(tokens: list[str]) -> list[str] | None:
    """The `jpeglm SUBCOMMAND ...` argv inside a command line, up to the next shell operator.

    Recognizes `jpeglm ...` (any path ending in /jpeglm) and `python -m jpeglm ...` / `torchrun ... -m jpeglm ...`.
    """
    for i, tok in enumerate(tokens):
        if os.path.basename(tok) == "jpeglm" and (i == 0 or tokens[i - 1] != "-m"):
            rest = tokens[i + 1 :]
        elif tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "jpeglm":
            rest = tokens[i + 2 :]
        else:
            continue
        for j, t in enumerate(rest):
            if t in _SHELL_OPERATORS:
                rest = rest[:j]
                break
        return ["jpeglm", *rest]
    return None


def shell_words(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    return list(lexer)


def manifest_commands(obj: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) for every jpeglm invocation in an object: container command+args and RayJob entrypoints."""
    found = []
    spec = obj.get("spec", {})
    if obj.get("kind") == "RayJob" and spec.get("entrypoint"):
        argv = jpeglm_argv(shell_words(spec["entrypoint"]))
        if argv:
            found.append(("spec.entrypoint", argv))
    for path, template in pod_templates(spec, ("spec",)):
        for c in template["spec"].get("containers", []) + template["spec"].get("initContainers", []):
            tokens = list(c.get("command", [])) + list(c.get("args", []))
            if tokens[:1] in (["bash"], ["/bin/bash"], ["sh"], ["/bin/sh"]) and "-c" in tokens:
                tokens = shell_words(tokens[tokens.index("-c") + 1])
            argv = jpeglm_argv(tokens)
            if argv:
                found.append((f"{_where(path)} container {c.get('name')}", argv))
    return found


def parse_jpeglm(argv: list[str]) -> argparse.Namespace:
    """Parse argv (starting with "jpeglm") with the real CLI parser; CheckError with argparse's message if it
    does not parse, or if the subcommand's module cannot be imported."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from jpeglm.cli import SUBCOMMANDS, build_parser

    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        raise CheckError(f"{shlex.join(argv)}: not a jpeglm subcommand (expected one of {', '.join(SUBCOMMANDS)})")
    try:
        parser = build_parser(argv[1])
    except ImportError as e:
        raise CheckError(f"{shlex.join(argv)}: cannot import {SUBCOMMANDS[argv[1]][0]}: {e}") from e
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv[1:])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise CheckError(f"{shlex.join(argv)}: {msg[-1] if msg else 'does not parse'}") from None


def check_command(argv: list[str], through_shell: bool) -> list[str]:
    problems = []
    if through_shell:
        # The RayJob entrypoint and sbatch lines go through bash: a value bash would split or expand is a bug.
        unsafe = [t for t in argv if shlex.quote(t) != t]
        if unsafe:
            problems.append(f"{shlex.join(argv)}: values need no shell quoting, got {unsafe}")
    try:
        parse_jpeglm(argv)
    except CheckError as e:
        problems.append(str(e))
    return problems


def placeholders(node: Any) -> set[str]:
    if isinstance(node, str):
        return set(PLACEHOLDER.findall(node))
    if isinstance(node, dict):
        return set().union(*map(placeholders, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(placeholders, node)) if node else set()
    return set()


# ---------------------------------------------------------------------------------------- k8s summary


def images(obj: dict) -> list[str]:
    out = []
    for _, template in pod_templates(obj.get("spec", {})):
        out += [c["image"] for c in template["spec"].get("containers", []) if "image" in c]
    return sorted(set(out))


def _resources(template: dict) -> str:
    c = template["spec"]["containers"][0]
    r = c.get("resources", {})
    req, lim = r.get("requests", {}), r.get("limits", {})
    parts = [f"cpu {req.get('cpu', lim.get('cpu', '-'))}", f"mem {lim.get('memory', req.get('memory', '-'))}"]
    if "nvidia.com/gpu" in lim:
        parts.append(f"gpu {lim['nvidia.com/gpu']}")
    return ", ".join(parts)


def summarize(obj: dict) -> list[str]:
    kind, meta, spec = obj["kind"], obj["metadata"], obj.get("spec", {})
    lines = [f"{kind}/{meta['name']} (namespace {meta.get('namespace', '<current>')})"]
    if kind == "RayJob":
        rc = spec["rayClusterSpec"]
        lines.append(f"  head: {_resources(rc['headGroupSpec']['template'])}")
        for g in rc.get("workerGroupSpecs", []):
            lines.append(
                f"  workers '{g['groupName']}': {g.get('minReplicas', 0)}..{g['maxReplicas']} pods "
                f"(autoscaling {'on' if rc.get('enableInTreeAutoscaling') else 'off'}), {_resources(g['template'])} each"
            )
        lines.append(f"  entrypoint: {spec['entrypoint']}")
    elif kind == "PyTorchJob":
        for role, r in spec["pytorchReplicaSpecs"].items():
            lines.append(
                f"  {role}: {r.get('replicas', 1)} pod(s) x {spec.get('nprocPerNode', 'auto')} processes, "
                f"{_resources(r['template'])}, restartPolicy {r.get('restartPolicy', 'Never')}"
            )
        c = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        lines.append(f"  command: {shlex.join(c.get('command', []) + c.get('args', []))}")
    elif kind == "PersistentVolumeClaim":
        lines.append(
            f"  {spec['resources']['requests']['storage']} {'/'.join(spec.get('accessModes', []))}, "
            f"storageClassName {spec.get('storageClassName', '<cluster default>')}"
        )
    elif kind == "ServiceAccount":
        for k, v in (meta.get("annotations") or {}).items():
            lines.append(f"  {k}: {v}")
    if images(obj):
        lines.append(f"  image: {', '.join(images(obj))}")
    return lines


def cpu_quantity(q: str | int | float) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def autoscaling_problems(rayjob: dict) -> list[str]:
    """The autoscaler adds workers only for queued tasks: preprocess must keep enough of them in flight to fill
    maxReplicas workers, or the cluster never grows past what its initial task queue asks for."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    if not cluster.get("enableInTreeAutoscaling"):
        return []
    capacity = 0.0
    for group in cluster.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpus = cpu_quantity(group.get("rayStartParams", {}).get("num-cpus", limits.get("cpu", 0)))
        capacity += group["maxReplicas"] * cpus
    argv = jpeglm_argv(shell_words(rayjob["spec"].get("entrypoint", ""))) or []
    if "--max-in-flight" not in argv:
        return ["the entrypoint has no --max-in-flight: preprocess sizes its queue from the CPUs present at start, "
                "so the autoscaler never grows the cluster much past minReplicas"]
    in_flight = argv[argv.index("--max-in-flight") + 1]
    if in_flight.isdigit() and int(in_flight) < capacity:
        return [f"--max-in-flight {in_flight} < {capacity:g} worker CPUs at maxReplicas: the autoscaler stops short of "
                f"maxReplicas (set MAX_IN_FLIGHT >= maxReplicas x CPUs per worker)"]
    return []


def check_k8s(env: str, job: str, out: Path | None = None, for_apply: bool = False) -> tuple[list[dict], list[str], list[str]]:
    """Render overlays/ENV/JOB and check it: (objects, problems, notes). Writes the YAML to `out` if given."""
    text, objects = render(overlay_dir(env, job))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    crds = crd_dir()
    problems, notes = [], []
    ray_pin = constraint_pins("cpu").get("ray")
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        p, n = validate_object(obj, crds)
        problems += [f"{name}: {x}" for x in p]
        notes += n
        for key in sorted(placeholders(obj)):
            problems.append(f"{name}: parameter {key} was not filled in (__{key}__ left): add {key}= to params.env")
        for where, argv in manifest_commands(obj):
            through_shell = obj["kind"] == "RayJob" and where == "spec.entrypoint"
            problems += [f"{name} {where}: {x}" for x in check_command(argv, through_shell)]
        if obj.get("kind") == "RayJob":
            version = obj["spec"]["rayClusterSpec"].get("rayVersion")
            if version != ray_pin:
                problems.append(f"{name}: rayVersion {version} differs from the ray pin {ray_pin} in constraints/cpu.txt")
            problems += [f"{name}: {p}" for p in autoscaling_problems(obj)]
        if for_apply:
            for image in images(obj):
                if PLACEHOLDER_TAG.search(image):
                    problems.append(
                        f"{name}: image {image} is the placeholder tag: set newTag in "
                        f"infra/k8s/overlays/{env}/env/kustomization.yaml to a pushed image (make -C infra images)"
                    )
    if not any(manifest_commands(o) for o in objects):
        problems.append(f"overlays/{env}/{job}: no `jpeglm` command found in any manifest")
    if crds is not None:
        notes.append("CRD x-kubernetes-validations (CEL rules) are not evaluated offline; the API server checks them")
    return objects, problems, notes


# ------------------------------------------------------------------------------------------------- Slurm

_VAR = re.compile(r"\$\{(\w+)(?::?[-=?+]([^}]*))?\}|\$(\w+)")


def logical_lines(text: str) -> list[str]:
    """Script lines with backslash continuations joined and full-line comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def substitute(line: str, values: dict[str, str]) -> str:
    """Expand $VAR / ${VAR} / ${VAR:-default} from values; variables without a value stay as they are."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in values:
            return values[name]
        if m.group(2) is not None and m.group(0).startswith("${" + name + ":-"):
            return m.group(2)
        return m.group(0)

    return _VAR.sub(repl, line)


def script_defaults(lines: list[str]) -> dict[str, str]:
    """Defaults a script gives its parameters: `NAME=${NAME:-default}` lines."""
    found = (re.fullmatch(r"\s*(\w+)=\$\{(\w+):-([^}$]*)\}\s*(#.*)?", line) for line in lines)
    return {m.group(1): m.group(3) for m in found if m and m.group(1) == m.group(2)}


def sbatch_commands(path: Path, values: dict[str, str]) -> list[tuple[int, list[str], set[str]]]:
    """(line number, jpeglm argv, variables without a value in it) for each jpeglm invocation in an sbatch script."""
    lines = logical_lines(path.read_text())
    values = {**script_defaults(lines), **values}
    found = []
    for n, line in enumerate(lines, 1):
        if not re.search(r"(^|[\s/])jpeglm(\s|$)", line):
            continue
        argv = jpeglm_argv(shell_words(substitute(line, values)))
        if argv:
            missing = {m.group(1) or m.group(3) for tok in argv for m in _VAR.finditer(tok)}
            found.append((n, argv, missing))
    return found


# Values of the variables the scripts compute at run time, for the flag check only.
SLURM_RUNTIME_EXAMPLES = {"ray_address": "10.0.0.1:6379", "world_size": "32"}


def check_slurm(job: str, params: dict[str, str]) -> tuple[list[str], list[str]]:
    script = INFRA / "slurm" / f"{job}.sbatch"
    problems, notes = [], []
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        problems.append(f"bash -n {script.name}: {proc.stderr.strip()}")
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        proc = subprocess.run([shellcheck, "--severity=warning", str(script)], capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(f"shellcheck {script.name}:\n{proc.stdout.strip()}")
    else:
        notes.append("shellcheck not installed: skipped")
    commands = sbatch_commands(script, {**SLURM_RUNTIME_EXAMPLES, **params})
    if not commands:
        problems.append(f"{script.name}: no `jpeglm` command found")
    for line, argv, missing in commands:
        if missing:
            problems.append(f"{script.name} line {line}: no value for {sorted(missing)} (add to the params file)")
        else:
            problems += [f"{script.name} line {line}: {x}" for x in check_command(argv, through_shell=True)]
    return problems, notes


# ------------------------------------------------------------------------------------------------ Docker


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out = []
    for line in logical_lines(path.read_text()):
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _dockerignore_regex(pattern: str) -> re.Pattern:
    rx = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            rx += ".*"
            i += 2
            if pattern.startswith("/", i):
                rx, i = rx[:-2] + "(.*/)?", i + 1
        elif pattern[i] == "*":
            rx, i = rx + "[^/]*", i + 1
        elif pattern[i] == "?":
            rx, i = rx + "[^/]", i + 1
        else:
            rx, i = rx + re.escape(pattern[i]), i + 1
    return re.compile(rx)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; `!` re-includes."""
    parents = [path] + [path.rsplit("/", k)[0] for k in range(1, path.count("/") + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in parents):
            excluded = not negate
    return excluded


def tracked_files(under: str) -> list[str]:
    proc = subprocess.run(["git", "ls-files", "--", under], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.split() if proc.returncode == 0 else []


def check_dockerfile(path: Path, flavor: str) -> list[str]:
    """Lint one Dockerfile (no docker engine needed): what a build would trip over, and drift from constraints."""
    problems = []
    instructions = dockerfile_instructions(path)
    ignore_file = path.with_name(path.name + ".dockerignore")
    patterns = [l.strip() for l in ignore_file.read_text().splitlines() if l.strip() and not l.startswith("#")] if ignore_file.exists() else []
    if not ignore_file.exists():
        problems.append(f"{path.name}: no {ignore_file.name} (the whole repository, .venv included, would be sent)")
    args = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k, v.strip('"'))
    copied = set()
    for instr, rest in instructions:
        if instr == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{path.name}: base image {image} is not pinned to a tag")
        if instr == "COPY" and "--from=" not in rest:
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            for src in words[:-1]:
                copied.add(src.rstrip("/"))
                if not (ROOT / src).exists():
                    problems.append(f"{path.name}: COPY source {src} does not exist in the build context (repo root)")
                    continue
                for f in tracked_files(src) or [src]:
                    if dockerignored(f, patterns):
                        problems.append(f"{path.name}: {f} is copied but excluded by {ignore_file.name}")
                        break
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    constraint = f"constraints/{flavor}.txt"
    if f"-c {constraint}" not in runs:
        problems.append(f"{path.name}: pip does not install with -c {constraint}")
    if constraint not in copied:
        problems.append(f"{path.name}: {constraint} is not copied into the image")
    pins = constraint_pins(flavor)
    if args.get("TORCH_VERSION") != pins.get("torch"):
        problems.append(f"{path.name}: ARG TORCH_VERSION={args.get('TORCH_VERSION')} but {constraint} pins torch=={pins.get('torch')}")
    index = "https://download.pytorch.org/whl/cpu" if flavor == "cpu" else "https://download.pytorch.org/whl/cu"
    if f"--index-url {index}" not in runs:
        problems.append(f"{path.name}: torch is not installed from {index}...")
    entrypoints = [rest for instr, rest in instructions if instr == "ENTRYPOINT"]
    if not entrypoints or yaml.safe_load(entrypoints[-1]) != ["jpeglm"]:
        problems.append(f"{path.name}: ENTRYPOINT must be [\"jpeglm\"] (exec form), got {entrypoints[-1:]}")
    last_from = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    users = [rest for instr, rest in instructions[last_from:] if instr == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"{path.name}: the final stage runs as root (add USER with a numeric uid)")
    return problems


def check_docker() -> list[str]:
    return check_dockerfile(INFRA / "docker" / "Dockerfile.cpu", "cpu") + check_dockerfile(INFRA / "docker" / "Dockerfile.cuda", "cuda")


# --------------------------------------------------------------------------------------------------- CLI


def _report(title: str, problems: list[str], notes: list[str]) -> int:
    for n in dict.fromkeys(notes):
        print(f"note: {n}")
    if problems:
        print(f"FAILED: {title}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"ok: {title}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("k8s", help="render overlays/ENV/JOB, validate it, print what would be applied")
    k.add_argument("job", choices=JOBS)
    k.add_argument("--overlay", default="dev", help="environment under infra/k8s/overlays (default: dev)")
    k.add_argument("--out", type=Path, help="write the rendered YAML here (what `make cluster-*` applies)")
    k.add_argument("--for-apply", action="store_true", help="also refuse placeholder image tags")
    s = sub.add_parser("slurm", help="bash -n, shellcheck and the jpeglm flags of infra/slurm/JOB.sbatch")
    s.add_argument("job", choices=JOBS)
    s.add_argument("--params", type=Path, default=INFRA / "slurm" / "params.example.env", help="KEY=VALUE file the job reads")
    sub.add_parser("docker", help="lint infra/docker/Dockerfile.cpu and Dockerfile.cuda")
    args = parser.parse_args(argv)
    try:
        if args.what == "k8s":
            if not overlay_dir(args.overlay, args.job).is_dir():
                parser.error(f"no overlay {overlay_dir(args.overlay, args.job)} (have: {', '.join(sorted({e for e, _ in overlays()}))})")
            objects, problems, notes = check_k8s(args.overlay, args.job, args.out, args.for_apply)
            for obj in objects:
                print("\n".join(summarize(obj)))
            if args.out:
                print(f"rendered: {args.out}")
            return _report(f"overlays/{args.overlay}/{args.job}: {len(objects)} objects", problems, notes)
        if args.what == "slurm":
            params = read_params(args.params)
            problems, notes = check_slurm(args.job, params)
            for _, argv_, _ in sbatch_commands(INFRA / "slurm" / f"{args.job}.sbatch", {**SLURM_RUNTIME_EXAMPLES, **params}):
                print(f"runs: {shlex.join(argv_)}")
            return _report(f"slurm/{args.job}.sbatch with {args.params}", problems, notes)
        return _report("infra/docker", check_docker(), [])
    except CheckError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
