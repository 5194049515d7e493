"""The cluster configs under cluster/: fast, offline checks that they are valid and agree with the code.

* cluster/aws.yaml goes through the Ray cluster launcher's own checks as `ray up` runs them
  (``prepare_config``, which merges the AWS defaults, then ``validate_config`` against
  ``ray/autoscaler/ray-schema.json``). Deliberately broken copies must be rejected. Its shape is
  checked beyond the schema: each node type advertises what its instance type has, the 8-GPU
  training type holds the README's 8 Ray Train workers on one node while a train worker fits no
  1-GPU type, and the max_workers caps add up.
* The KubeRay manifests are checked for the structure that matters: ray.io/v1, a head that runs
  no tasks, GPU limits on the workers, the project image and service account, token auth, and
  entrypoints. An entrypoint must name a job module that exists, a config file that exists, and
  a config the job's own config class accepts (the pipeline's stage sections included).
  Extraction runs on 1-GPU pods; the train RayJob runs all its workers on one 8-GPU pod with a
  sized /dev/shm and NCCL settings. The
  checks are functions that return a list of problems, and each is also shown to catch a
  broken copy.
* cluster/Dockerfile must install the torch/torchvision pinned in pyproject.toml, the DALI
  package pyproject.toml asks for, and one CUDA major version throughout.
* cluster/request_gpus.py is tested with a fake autoscaler and clock.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS_YAML = CLUSTER / "aws.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
PAPER_EXTRACT = ROOT / "configs" / "extract_paper_ava.yaml"
RAYJOB_FILES = {"extract": "rayjob-extract.yaml", "distill": "rayjob-distill.yaml", "train_student": "rayjob-train.yaml",
                "pipeline": "rayjob-pipeline.yaml"}
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
#: (vCPUs, GPUs) of the EC2 instance types cluster/aws.yaml uses or suggests (AWS's instance pages).
EC2_SHAPES = {"m6i.2xlarge": (8, 0), "g5.2xlarge": (8, 1), "g6.2xlarge": (8, 1), "g6e.2xlarge": (8, 1),
              "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8), "p5.48xlarge": (192, 8)}
TRAIN_GPUS = 8  # GPUs of a training node: the 8 DDP workers of one student run share its NVLink
MIN_TRAIN_SHM_GIB = 32  # /dev/shm of an 8-GPU pod: NCCL's segments and Ray's object store


@functools.cache
def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {(r := Requirement(d)).name.lower(): r for d in deps}


def exact_pin(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


@functools.cache
def paper_extract() -> dict:
    """The paper extraction's keys, as the job reads them (its base file resolved)."""
    from ray_jobs.config import read_tree

    return read_tree(PAPER_EXTRACT)


def cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gib_quantity(value) -> float:
    """A Kubernetes memory quantity (``64Gi``, ``512Mi``, ``1Ti``, plain bytes) in GiB."""
    text = str(value)
    for suffix, gib in (("Ki", 2 ** -20), ("Mi", 2 ** -10), ("Gi", 1), ("Ti", 2 ** 10)):
        if text.endswith(suffix):
            return float(text[:-2]) * gib
    return float(text) / 2 ** 30


# ---------------------------------------------------------------------------------------------
# Job entrypoints, checked with the jobs' own config classes
# ---------------------------------------------------------------------------------------------

def config_class(job: str) -> type:
    """The config dataclass that ``run_job(JOB, Cls, ...)`` receives in ray_jobs/<job>.py."""
    module_file = ROOT / "ray_jobs" / f"{job}.py"
    names = [node.args[1].id for node in ast.walk(ast.parse(module_file.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_job"
             and len(node.args) >= 2 and isinstance(node.args[1], ast.Name)]
    assert len(names) == 1, f"{module_file}: no single run_job(JOB, ConfigClass, ...) call"
    return getattr(importlib.import_module(f"ray_jobs.{job}"), names[0])


def entrypoint_problems(entrypoint: str, where: str) -> list[str]:
    """`python -m ray_jobs.<job> [--config FILE] [key=value ...]`: the module exists, FILE exists,
    and the job's config class accepts the result (for the pipeline, every stage section too)."""
    from ray_jobs.config import ConfigError, load_config

    argv = shlex.split(entrypoint)
    if argv[:2] != ["python", "-m"] or len(argv) < 3 or not re.fullmatch(r"ray_jobs\.\w+", argv[2]):
        return [f"{where}: entrypoint {entrypoint!r} is not `python -m ray_jobs.<job> ...`"]
    job = argv[2].split(".", 1)[1]
    problems, config, overrides, args = [], None, [], argv[3:]
    while args:
        arg = args.pop(0)
        if arg == "--config":
            config = args.pop(0) if args else None
            if not config:
                problems.append(f"{where}: --config without a file")
        elif re.fullmatch(r"[A-Za-z_][\w.]*=.*", arg, flags=re.S):
            overrides.append(arg)
        else:
            problems.append(f"{where}: argument {arg!r} is neither --config FILE nor key=value")
    for value in [config or ""] + [o.split("=", 1)[1] for o in overrides]:
        if value.startswith("configs/") and not (ROOT / value).is_file():
            problems.append(f"{where}: config file {value} does not exist")
    if not (ROOT / "ray_jobs" / f"{job}.py").is_file():
        problems.append(f"{where}: module ray_jobs/{job}.py does not exist")
    if problems:
        return problems
    try:
        parsed = load_config(config_class(job), str(ROOT / config) if config else None, overrides)
        if job == "pipeline":
            from ray_jobs.stages.pipeline import plan_experiments, stage_configs

            stage_configs(parsed)
            plan_experiments(parsed, "knowledge-0")
    except ConfigError as exc:
        problems.append(f"{where}: {exc}")
    return problems


def job_config(entrypoint: str):
    """The config object a (valid) ``python -m ray_jobs.<job> ...`` entrypoint gives its job."""
    from ray_jobs.config import load_config

    argv = shlex.split(entrypoint)
    args, config, overrides = argv[3:], None, []
    while args:
        arg = args.pop(0)
        if arg == "--config":
            config = str(ROOT / args.pop(0))
        else:
            overrides.append(arg)
    return load_config(config_class(argv[2].split(".", 1)[1]), config, overrides)


def max_workers_of(train_cfg) -> int:
    """The most DDP workers a train config asks for (a count, or the top of [min, max])."""
    workers = train_cfg.num_workers
    return workers if isinstance(workers, int) else max(workers)


# ---------------------------------------------------------------------------------------------
# cluster/aws.yaml: Ray's own validation
# ---------------------------------------------------------------------------------------------

def ray_validate(config: dict, mutate=None) -> dict:
    """What `ray up` does offline: merge the provider defaults, then validate against Ray's
    schema (and its extra checks). ``mutate`` breaks the merged config before validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    if mutate:
        mutate(prepared)
    validate_config(prepared)
    return prepared


@functools.cache
def _aws_config() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def aws_config() -> dict:
    return copy.deepcopy(_aws_config())


def test_aws_config_passes_rays_cluster_config_validation():
    prepared = ray_validate(aws_config())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _drop(key):
    return lambda c: c.pop(key)


def _set(path, value):
    def mutate(c):
        node = c
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate", [
    _set(["max_worker"], 8),                                                   # unknown top-level key
    _drop("provider"),                                                         # required
    _set(["available_node_types", "gpu_spot", "min_worker"], 0),              # typo in a node type
    _set(["available_node_types", "gpu_spot", "resources", "GPU"], 0.5),      # resources are integers
    _set(["docker", "imagee"], "x"),                                           # unknown docker key
    _set(["head_node_type"], "no-such-type"),                                  # not among the node types
    _set(["available_node_types", "gpu_spot", "min_workers"], 99),            # sum(min_workers) > max_workers
    _set(["available_node_types", "train_8gpu", "docker", "run_options"], []),  # per type: worker_run_options
], ids=["unknown-top-level-key", "missing-provider", "node-type-typo", "fractional-gpu", "unknown-docker-key",
        "bad-head-type", "min-over-max", "node-type-docker-key"])
def test_broken_aws_configs_fail_rays_validation(mutate):
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(aws_config(), mutate)


@functools.cache
def readme_8gpu_train_config():
    """The README's train_student command for the 8-GPU node type (the one that sets cpus_per_worker)."""
    (command,) = [c for c in readme_commands() if "ray_jobs.train_student" in c and "cpus_per_worker=" in c]
    return job_config(command)


def aws_training_problems(cfg: dict, train_cfg) -> list[str]:
    """The 8-GPU training type against the README's training command ``train_cfg``: its 8 Ray Train
    workers fit one such node, one of them fits no 1-GPU type (so training is steered to the
    8-GPU type), and the type ships switched off so extraction's 1-GPU requests keep their pool."""
    problems = []
    workers = {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}
    train_types = {n: t for n, t in workers.items() if t["resources"].get("GPU") == TRAIN_GPUS}
    if not train_types:
        return [f"no worker type with {TRAIN_GPUS} GPUs for the student trainer"]
    n_workers, cpus = max_workers_of(train_cfg), train_cfg.cpus_per_worker
    if n_workers != TRAIN_GPUS or train_cfg.device != "cuda":
        problems.append(f"the README's 8-GPU training command must ask num_workers={TRAIN_GPUS} and device=cuda")
    for name, t in train_types.items():
        if n_workers * cpus > t["resources"].get("CPU", 0):
            problems.append(f"{name}: {n_workers} train workers × cpus_per_worker {cpus:g} do not fit one node")
        if t.get("max_workers", 0) != 0:
            problems.append(f"{name}: must ship with max_workers 0 (it would serve extraction's 1-GPU requests)")
        run_options = " ".join(t.get("docker", {}).get("worker_run_options", []))
        for variable in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME"):
            if f"{variable}=" not in run_options:
                problems.append(f"{name}: docker worker_run_options must set {variable}")
    for name, t in workers.items():
        if t["resources"].get("GPU") == 1 and cpus <= t["resources"].get("CPU", 0):
            problems.append(f"{name}: a train worker (cpus_per_worker {cpus:g}) fits this 1-GPU type, so "
                            f"training is not steered to the {TRAIN_GPUS}-GPU type")
    spot_max = max((t.get("max_workers", 0) for t in workers.values()
                    if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"), default=0)
    if cfg["max_workers"] < spot_max + 1:
        problems.append("max_workers leaves no room for a training node beside the spot extraction pool")
    return problems


def aws_problems(cfg: dict) -> list[str]:
    """The cluster's shape, beyond the schema."""
    problems = []
    for name, t in cfg["available_node_types"].items():
        instance = t["node_config"].get("InstanceType")
        if instance not in EC2_SHAPES:
            problems.append(f"{name}: instance type {instance!r} is not in this test's EC2_SHAPES")
            continue
        vcpus, gpus = EC2_SHAPES[instance]
        if t["resources"].get("GPU", 0) != gpus:
            problems.append(f"{name}: advertises GPU: {t['resources'].get('GPU', 0)}, a {instance} has {gpus}")
        if t["resources"].get("CPU", 0) > vcpus:
            problems.append(f"{name}: advertises more CPUs than the {vcpus} vCPUs of a {instance}")
    if cfg["max_workers"] < sum(t.get("max_workers", 0) for n, t in cfg["available_node_types"].items()
                                if n != cfg["head_node_type"]):
        problems.append("max_workers is below the sum of the worker types' max_workers (a type's cap would not apply)")
    extract = paper_extract()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if head["resources"].get("CPU") != 0 or head["resources"].get("GPU", 0):
        problems.append("the head must advertise CPU: 0 and no GPU (nothing scheduled on it)")
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    for name, t in workers.items():
        if t["resources"].get("GPU", 0) < 1:
            problems.append(f"{name}: worker types are GPU types")
        if t["resources"].get("CPU", 0) <= extract["cpus_per_worker"]:
            problems.append(f"{name}: needs more CPUs than cpus_per_worker ({extract['cpus_per_worker']}) for Ray Data's tasks")
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}: GPU workers must scale from 0")
    spot = [n for n, t in workers.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    if not spot:
        problems.append("no spot GPU worker type")
    elif max(workers[n].get("max_workers", 0) for n in spot) < extract["workers"]:
        problems.append(f"the spot type cannot reach the {extract['workers']} workers of {PAPER_EXTRACT.name}")
    if cfg["max_workers"] < extract["workers"]:
        problems.append(f"max_workers < workers of {PAPER_EXTRACT.name}")
    for name, t in types.items():
        arn = t["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        if not re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn):
            problems.append(f"{name}: needs an IamInstanceProfile Arn (S3 through the instance role)")
    if not cfg.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be set")
    if not cfg.get("docker", {}).get("image"):
        problems.append("docker.image must be the project image")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any("RAY_AUTH_MODE=token" in c for c in cfg[key]):
            problems.append(f"{key}: token auth (RAY_AUTH_MODE=token) is not enabled")
    if "~/.ray/auth_token" not in cfg.get("file_mounts", {}):
        problems.append("file_mounts must carry ~/.ray/auth_token to every node")
    if not any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in cfg["head_start_ray_commands"]):
        problems.append("the head must start the autoscaler")
    return problems


def test_aws_cluster_shape():
    assert aws_problems(aws_config()) == []
    assert aws_training_problems(aws_config(), readme_8gpu_train_config()) == []


@pytest.mark.parametrize("mutate, expected", [
    (_set(["available_node_types", "head", "resources"], {"CPU": 8}), "CPU: 0"),
    (_set(["available_node_types", "gpu_spot", "resources", "CPU"], 4), "more CPUs"),
    (lambda c: c["available_node_types"]["gpu_spot"]["node_config"].pop("InstanceMarketOptions"), "spot"),
    (lambda c: c["available_node_types"]["gpu_spot"]["node_config"].pop("IamInstanceProfile"), "IamInstanceProfile"),
    (_set(["worker_start_ray_commands"], ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]), "token auth"),
    (_set(["max_workers"], 2), "max_workers"),
    (_set(["available_node_types", "gpu_spot", "resources", "GPU"], 8), "a g5.2xlarge has 1"),
    (_set(["available_node_types", "train_8gpu", "resources", "CPU"], 192), "more CPUs than the 96 vCPUs"),
    (_set(["available_node_types", "gpu_spot", "max_workers"], 10), "sum of the worker types' max_workers"),
])
def test_aws_shape_checks_catch_breakage(mutate, expected):
    cfg = aws_config()
    mutate(cfg)
    assert any(expected in p for p in aws_problems(cfg))


@pytest.mark.parametrize("mutate, overrides, expected", [
    (_set(["available_node_types", "train_8gpu", "resources", "GPU"], 4), [], "no worker type with 8 GPUs"),
    (_set(["available_node_types", "train_8gpu", "resources", "CPU"], 80), [], "do not fit one node"),
    (lambda c: None, ["cpus_per_worker=13"], "do not fit one node"),
    (lambda c: None, ["cpus_per_worker=8"], "fits this 1-GPU type"),
    (lambda c: None, ["num_workers=[1,4]"], "num_workers=8"),
    (_set(["available_node_types", "train_8gpu", "max_workers"], 1), [], "max_workers 0"),
    (lambda c: c["available_node_types"]["train_8gpu"].pop("docker"), [], "NCCL_DEBUG"),
    (_set(["max_workers"], 8), [], "no room for a training node"),
])
def test_aws_training_checks_catch_breakage(mutate, overrides, expected):
    import dataclasses

    cfg = aws_config()
    mutate(cfg)
    train_cfg = readme_8gpu_train_config()
    for override in overrides:
        key, value = override.split("=", 1)
        train_cfg = dataclasses.replace(train_cfg, **{key: yaml.safe_load(value)})
    problems = aws_training_problems(cfg, train_cfg)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------

@functools.cache
def _kuberay_docs() -> tuple[tuple[str, dict], ...]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return tuple(docs)


def kuberay_docs() -> list[tuple[str, dict]]:
    """Every document of every manifest (deep copies: tests may change them)."""
    return copy.deepcopy(list(_kuberay_docs()))


def service_account() -> tuple[str, str]:
    (sa,) = [d for _, d in kuberay_docs() if d.get("kind") == "ServiceAccount"]
    return sa["metadata"]["name"], sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")


@functools.cache
def dockerfile_workdir() -> str:
    return [line.split(None, 1)[1].strip() for line in DOCKERFILE.read_text().splitlines() if line.startswith("WORKDIR ")][-1]


def env_problems(env: list[dict] | dict, where: str) -> list[str]:
    names = set(env) if isinstance(env, dict) else {e["name"] for e in env}
    return [f"{where}: secret {n} must not be set in a manifest" for n in sorted(names & SECRET_ENV)]


def multi_gpu_pod_problems(spec: dict, container: dict, where: str) -> list[str]:
    """An 8-GPU pod: a memory-backed /dev/shm big enough for NCCL between 8 ranks and Ray's object
    store (the runtime's default is 64 MiB), and NCCL told its log level and socket interface."""
    problems = []
    shm = [m["name"] for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
    volume = next((v for v in spec.get("volumes", []) if shm and v.get("name") == shm[0]), {})
    empty_dir = volume.get("emptyDir", {})
    if empty_dir.get("medium") != "Memory" or gib_quantity(empty_dir.get("sizeLimit", 0)) < MIN_TRAIN_SHM_GIB:
        problems.append(f"{where}: an {TRAIN_GPUS}-GPU pod needs /dev/shm as a Memory emptyDir of at least "
                        f"{MIN_TRAIN_SHM_GIB}Gi")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    for variable in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME"):
        if not env.get(variable):
            problems.append(f"{where}: an {TRAIN_GPUS}-GPU pod must set {variable}")
    return problems


def group_gpus(group: dict) -> int:
    return group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)


def pod_problems(template: dict, where: str, image: str, sa: str, gpu: bool) -> list[str]:
    problems = []
    spec = template["spec"]
    if spec.get("serviceAccountName") != sa:
        problems.append(f"{where}: serviceAccountName must be {sa!r} (IRSA role for S3)")
    container = spec["containers"][0]
    if container.get("image") != image:
        problems.append(f"{where}: image {container.get('image')!r} is not the project image {image!r}")
    resources = container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if gpu:
        if limits.get("nvidia.com/gpu") not in (1, TRAIN_GPUS):
            problems.append(f"{where}: GPU workers need limits nvidia.com/gpu: 1 (extraction pool) or "
                            f"{TRAIN_GPUS} (training)")
        if requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu")) != limits.get("nvidia.com/gpu"):
            problems.append(f"{where}: GPU requests and limits differ")
        if limits.get("nvidia.com/gpu") == TRAIN_GPUS:
            problems += multi_gpu_pod_problems(spec, container, where)
        if cpu_quantity(limits.get("cpu", 0)) <= paper_extract()["cpus_per_worker"]:
            problems.append(f"{where}: needs more CPUs than cpus_per_worker for Ray Data's tasks")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            problems.append(f"{where}: no toleration for the nvidia.com/gpu taint")
    elif "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
        problems.append(f"{where}: the head must not take a GPU")
    problems += env_problems(container.get("env", []), where)
    return problems


def cluster_spec_problems(spec: dict, where: str, image: str, sa: str) -> list[str]:
    problems = []
    ray_req = pyproject_requirements()["ray"]
    if str(spec.get("rayVersion")) not in ray_req.specifier:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is outside pyproject's {ray_req}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}: authOptions.mode must be token")
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(f"{where}: head rayStartParams num-cpus must be \"0\" (no tasks on the head)")
    problems += pod_problems(head["template"], f"{where} head", image, sa, gpu=False)
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}: no worker group")
    for group in groups:
        gw = f"{where} group {group.get('groupName')!r}"
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 0)
        if not (0 <= lo <= n <= hi and hi >= 1):
            problems.append(f"{gw}: needs minReplicas <= replicas <= maxReplicas, maxReplicas >= 1")
        problems += pod_problems(group["template"], gw, image, sa, gpu=True)
    for params, w in [(head.get("rayStartParams", {}), "head")] + [(g.get("rayStartParams", {}), g.get("groupName"))
                                                                    for g in groups]:
        if any(not isinstance(v, str) for v in params.values()):
            problems.append(f"{where} {w}: rayStartParams values must be strings (the CRD's map[string]string)")
    return problems


def kuberay_problems(name: str, doc: dict, image: str, sa: str) -> list[str]:
    kind = doc.get("kind")
    if kind == "ServiceAccount":
        return []
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"{name}: apiVersion {doc.get('apiVersion')!r} is not ray.io/v1"]
    spec = doc["spec"]
    if kind == "RayCluster":
        problems = cluster_spec_problems(spec, name, image, sa)
        if spec.get("enableInTreeAutoscaling") is not True:
            problems.append(f"{name}: the long-running cluster must autoscale")
        for group in spec.get("workerGroupSpecs", []):
            if group.get("minReplicas", 0) != 0 or group.get("maxReplicas", 0) < paper_extract()["workers"]:
                problems.append(f"{name}: GPU group must scale from 0 to at least {paper_extract()['workers']}")
        return problems
    if kind != "RayJob":
        return [f"{name}: unexpected kind {kind!r}"]
    problems = entrypoint_problems(spec.get("entrypoint", ""), name)
    entrypoint_valid = not problems
    job = re.search(r"ray_jobs\.(\w+)", spec.get("entrypoint", ""))
    if not job or RAYJOB_FILES.get(job.group(1)) != name:
        problems.append(f"{name}: entrypoint runs {job and job.group(1)!r}, not the job this file is named for")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{name}: shutdownAfterJobFinishes must be true (the cluster goes away with the job)")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append(f"{name}: working_dir is a path in the image: needs the K8sJobMode submitter")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    env_vars = runtime_env.get("env_vars", {})
    if not env_vars.get("AWS_REGION"):
        problems.append(f"{name}: runtimeEnvYAML env_vars must set AWS_REGION")
    if any(not isinstance(v, str) for v in env_vars.values()):
        problems.append(f"{name}: runtimeEnvYAML env_vars values must be strings")
    problems += env_problems(env_vars, f"{name} runtimeEnvYAML")
    if runtime_env.get("working_dir") != dockerfile_workdir():
        problems.append(f"{name}: working_dir must be the image's WORKDIR {dockerfile_workdir()!r}")
    if "rayClusterSpec" not in spec:
        return problems + [f"{name}: needs a rayClusterSpec"]
    problems += cluster_spec_problems(spec["rayClusterSpec"], name, image, sa)
    groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
    if job and job.group(1) == "extract":
        if sum(g.get("minReplicas", 0) for g in groups) < paper_extract()["workers"]:
            problems.append(f"{name}: fewer fixed GPU workers than the extraction's actors (GPUs must exist at start)")
        if any(group_gpus(g) != 1 for g in groups):
            problems.append(f"{name}: extraction keeps its 1-GPU pool (one GPU per pod)")
    if job and job.group(1) == "train_student" and entrypoint_valid:
        problems += train_job_problems(spec, name)
    return problems


def train_job_problems(spec: dict, name: str) -> list[str]:
    """The train RayJob targets one 8-GPU pod: every DDP worker on it (NVLink between them), their
    CPUs within its CPU limit, and the pod there when the job starts."""
    problems = []
    cfg = job_config(spec["entrypoint"])
    groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
    for group in groups:
        gw = f"{name} group {group.get('groupName')!r}"
        if group_gpus(group) != TRAIN_GPUS:
            problems.append(f"{gw}: the student trainer runs on {TRAIN_GPUS}-GPU pods")
            continue
        if max_workers_of(cfg) > TRAIN_GPUS:
            problems.append(f"{gw}: num_workers {cfg.num_workers} do not fit one pod's {TRAIN_GPUS} GPUs")
        cpus = cpu_quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("cpu", 0))
        if max_workers_of(cfg) * cfg.cpus_per_worker > cpus:
            problems.append(f"{gw}: {max_workers_of(cfg)} workers × cpus_per_worker {cfg.cpus_per_worker:g} "
                            f"exceed the pod's {cpus:g} CPUs")
        if group.get("minReplicas", 0) < 1:
            problems.append(f"{gw}: minReplicas must be >= 1 (device=cuda needs the GPUs at start)")
    if cfg.device != "cuda":
        problems.append(f"{name}: device must be cuda")
    return problems


def test_kuberay_manifests_parse_and_hold_their_structure():
    docs = kuberay_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["RayCluster", *["RayJob"] * len(RAYJOB_FILES), "ServiceAccount"]
    assert {n for n, d in docs if d["kind"] == "RayJob"} == set(RAYJOB_FILES.values())
    sa, role = service_account()
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), "the service account needs an IRSA role"
    image = aws_config()["docker"]["image"]  # one image for the launcher and for Kubernetes
    problems = [p for name, doc in docs for p in kuberay_problems(name, doc, image, sa)]
    assert problems == []


def _rayjob(name: str) -> dict:
    return next(d for n, d in kuberay_docs() if n == name)


def _worker(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda d: _worker(d)["resources"]["limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu: 1"),
    (lambda d: _worker(d)["resources"].update(limits={**_worker(d)["resources"]["limits"], "nvidia.com/gpu": 8},
                                               requests={**_worker(d)["resources"]["requests"], "nvidia.com/gpu": 8}),
     "1-GPU pool"),
    (lambda d: d["spec"].update(entrypoint="python -m ray_jobs.extrakt --config configs/extract_paper_ava.yaml"),
     "does not exist"),
    (lambda d: d["spec"].update(entrypoint="python -m ray_jobs.extract --config configs/no_such.yaml"), "does not exist"),
    (lambda d: d["spec"].update(entrypoint="python -m ray_jobs.extract --config configs/extract_paper_ava.yaml devise=cuda"),
     "unknown config key 'devise'"),
    (lambda d: d["spec"].update(entrypoint="python -m ray_jobs.distill store=s3://b/s gsf_entry=configs/extract_paper_ava.yaml"),
     "not the job this file is named for"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),
    (lambda d: _worker(d).setdefault("env", []).append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}), "secret"),
    (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {}\n"), "AWS_REGION"),
    (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    (lambda d: _worker(d).update(image="rayproject/ray:2.60.0-gpu"), "project image"),
    (lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.59.0"), "rayVersion"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=2, replicas=2), "fewer fixed GPU"),
])
def test_kuberay_checks_catch_breakage(mutate, expected):
    doc = copy.deepcopy(_rayjob("rayjob-extract.yaml"))
    sa, _ = service_account()
    image = aws_config()["docker"]["image"]
    assert kuberay_problems("rayjob-extract.yaml", doc, image, sa) == []
    mutate(doc)
    problems = kuberay_problems("rayjob-extract.yaml", doc, image, sa)
    assert any(expected in p for p in problems), problems


def _set_override(key: str, value: str):
    """Mutate a RayJob: replace (or add) ``key=`` in its entrypoint."""
    def mutate(d):
        argv = [a for a in shlex.split(d["spec"]["entrypoint"]) if not a.startswith(f"{key}=")]
        d["spec"]["entrypoint"] = shlex.join([*argv, f"{key}={value}"])
    return mutate


def _train_volumes(d: dict) -> list[dict]:
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: _worker(d)["resources"].update(limits={**_worker(d)["resources"]["limits"], "nvidia.com/gpu": 1},
                                               requests={**_worker(d)["resources"]["requests"], "nvidia.com/gpu": 1}),
     "8-GPU pods"),
    (_set_override("num_workers", "16"), "do not fit one pod"),
    (_set_override("cpus_per_worker", "12"), "exceed the pod's 90 CPUs"),
    (lambda d: _train_volumes(d)[0]["emptyDir"].update(sizeLimit="1Gi"), "/dev/shm"),
    (lambda d: _train_volumes(d)[0].update(emptyDir={}), "/dev/shm"),
    (lambda d: _worker(d).update(env=[e for e in _worker(d)["env"] if e["name"] != "NCCL_DEBUG"]), "NCCL_DEBUG"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=0, replicas=0), "minReplicas"),
])
def test_train_job_checks_catch_breakage(mutate, expected):
    doc = copy.deepcopy(_rayjob("rayjob-train.yaml"))
    sa, _ = service_account()
    image = aws_config()["docker"]["image"]
    assert kuberay_problems("rayjob-train.yaml", doc, image, sa) == []
    mutate(doc)
    problems = kuberay_problems("rayjob-train.yaml", doc, image, sa)
    assert any(expected in p for p in problems), problems


def test_train_entrypoint_form():
    """The student trainer's entrypoint: key=value overrides only (no config file for it exists),
    8 workers, one per GPU of its pod."""
    argv = shlex.split(_rayjob("rayjob-train.yaml")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs.train_student"]
    keys = {a.split("=", 1)[0] for a in argv[3:]}
    assert all("=" in a for a in argv[3:]) and {"store", "knowledge_entry", "student.backbone", "num_workers"} <= keys
    assert job_config(_rayjob("rayjob-train.yaml")["spec"]["entrypoint"]).num_workers == TRAIN_GPUS


# ---------------------------------------------------------------------------------------------
# README: every command and config it names exists
# ---------------------------------------------------------------------------------------------

def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line[line.index("python -m ray_jobs."):].split("#")[0] for line in lines if "python -m ray_jobs." in line]


def test_readme_commands_and_configs_exist():
    commands = readme_commands()
    assert {re.search(r"ray_jobs\.(\w+)", c).group(1) for c in commands} == set(RAYJOB_FILES)
    problems = [p for c in commands for p in entrypoint_problems(c, "cluster/README.md")]
    assert problems == []
    referenced = set(re.findall(r"configs/[\w.-]+\.ya?ml", "\n".join(p.read_text() for p in CLUSTER.rglob("*")
                                                                       if p.is_file() and p.suffix in {".md", ".yaml"})))
    assert referenced and all((ROOT / c).is_file() for c in referenced), referenced


def test_entrypoint_checks_catch_breakage():
    assert entrypoint_problems("python -m ray_jobs.distill store=s3://b/s gsf_entry=configs/no_such_config.yaml", "x")
    assert entrypoint_problems("python -m ray_jobs.distill stor=s3://b/s", "x")
    assert entrypoint_problems("python -m ray_jobs.nope", "x")
    assert entrypoint_problems("python3 -m ray_jobs.extract", "x")
    assert entrypoint_problems("python -m ray_jobs.distill store=s3://b/s gsf_entry=k", "x") == []
    assert entrypoint_problems("python -m ray_jobs.pipeline --config configs/paper_ava.yaml train.epocs=3", "x")
    assert entrypoint_problems("python -m ray_jobs.pipeline --config configs/paper_ava.yaml extract.store=s3://b", "x")
    assert entrypoint_problems("python -m ray_jobs.pipeline --config configs/paper_ava.yaml train.device=cuda", "x") == []


def test_no_credentials_in_cluster_files():
    patterns = [r"AKIA[0-9A-Z]{16}", r"BEGIN [A-Z ]*PRIVATE KEY",
                r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token|ray_auth_token)\s*[:=]\s*\S"]
    hits = [(p.name, m.group(0)) for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".pyc"
            for pattern in patterns for m in re.finditer(pattern, p.read_text())]
    assert hits == []


# ---------------------------------------------------------------------------------------------
# cluster/Dockerfile against pyproject.toml
# ---------------------------------------------------------------------------------------------

def expand_dockerfile(text: str) -> str:
    """Continuation lines joined and ARG defaults substituted (${X} and $X)."""
    lines = text.replace("\\\n", " ").splitlines()
    args = {}
    for line in lines:
        m = re.match(r"\s*ARG\s+(\w+)=(\S+)", line)
        if m:
            args[m.group(1)] = m.group(2)
    out = "\n".join(lines)
    for _ in range(5):  # ARG defaults may refer to earlier ARGs
        out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), out)
    return out


def cuda_major(tag: str) -> int:
    """'cuda120' / 'cu128' / '12.8.1' → 12."""
    if "." in tag:
        return int(tag.split(".")[0])
    digits = re.sub(r"\D", "", tag)
    return int(digits[:-1])


def dockerfile_problems(text: str) -> list[str]:
    reqs = pyproject_requirements()
    expanded = expand_dockerfile(text)
    instructions = [line for line in expanded.splitlines() if line and not line.lstrip().startswith("#")]
    body = "\n".join(instructions)
    problems = []
    for name in ("torch", "torchvision"):
        pin = exact_pin(reqs[name])
        if not re.search(rf"(?<![\w-]){name}=={re.escape(pin)}(?![\w.])", body):
            problems.append(f"the image must install {name}=={pin} (pyproject.toml's pin)")
    dali = next((r for n, r in reqs.items() if n.startswith("nvidia-dali-cuda")), None)
    if dali is None:
        return problems + ["pyproject.toml has no nvidia-dali-cuda* dependency"]
    installed = re.findall(r"(?<![\w-])(nvidia-dali-cuda\d+)(?:==([\w.]+))?", body)
    if not installed:
        problems.append("the image installs no nvidia-dali-cuda* package")
    for pkg, version in installed:
        if pkg != dali.name:
            problems.append(f"the image installs {pkg}, pyproject.toml asks for {dali.name}")
        if version and Version(version) not in dali.specifier:
            problems.append(f"{pkg}=={version} is outside pyproject.toml's {dali.specifier}")
    majors = {f"DALI ({dali.name})": cuda_major(dali.name.rsplit("-", 1)[1])}
    base = re.search(r"^FROM\s+nvidia/cuda:(\d+\.\d+(?:\.\d+)?)", body, flags=re.M)
    if base:
        majors["base image"] = cuda_major(base.group(1))
    else:
        problems.append("the base image must be nvidia/cuda:<12.x>-...")
    index = re.search(r"--index-url\s+\S*/whl/(cu\d+)", body)
    if index:
        majors["torch wheel index"] = cuda_major(index.group(1))
    else:
        problems.append("torch must come from a CUDA-specific wheel index (/whl/cuXYZ)")
    if len(set(majors.values())) != 1:
        problems.append(f"CUDA major versions disagree: {majors}")
    users = re.findall(r"^USER\s+(\S+)", body, flags=re.M)
    if not users or users[-1] in ("root", "0"):
        problems.append("the image must end as a non-root USER")
    if not re.search(r"^WORKDIR\s+\S+", body, flags=re.M):
        problems.append("the image needs a WORKDIR")
    if re.search(r"^(ENV|ARG)\s+.*(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)", body,
                 flags=re.M):
        problems.append("no credentials in the image")
    return problems


def test_dockerfile_matches_pyproject_pins_and_one_cuda_major():
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    assert "nvidia-dali-cuda130" in expand_dockerfile(text)


@pytest.mark.parametrize("old, new, expected", [
    ("ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.13.0", "torch==2.14.1"),
    ("ARG TORCHVISION_VERSION=0.29.1", "ARG TORCHVISION_VERSION=0.28.0", "torchvision==0.29.1"),
    ("ARG DALI_PACKAGE=nvidia-dali-cuda130", "ARG DALI_PACKAGE=nvidia-dali-cuda120", "pyproject.toml asks for"),
    ("ARG TORCH_CUDA=cu130", "ARG TORCH_CUDA=cu128", "CUDA major versions disagree"),
    ("ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu22.04", "ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu22.04",
     "CUDA major versions disagree"),
    ("ARG DALI_VERSION=2.4.0", "ARG DALI_VERSION=2.3.0", "outside"),
    ("USER ray", "USER root", "non-root"),
])
def test_dockerfile_checks_catch_drift(old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# cluster/request_gpus.py with a fake autoscaler
# ---------------------------------------------------------------------------------------------

def load_request_gpus():
    spec = importlib.util.spec_from_file_location("request_gpus", CLUSTER / "request_gpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeCluster:
    """GPU nodes join one per poll after a request, up to ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity, self.gpus, self.requests, self.now = capacity, 0, [], 0.0

    def request(self, bundles):
        self.requests.append(bundles)

    def cluster_gpus(self):
        wanted = len(self.requests[-1]) if self.requests else 0
        self.gpus = min(self.gpus + 1, wanted, self.capacity) if self.gpus < wanted else self.gpus
        return float(self.gpus)

    def sleep(self, s):
        self.now += s

    def clock(self):
        return self.now


def test_request_gpus_waits_for_the_gpus():
    rg, fake = load_request_gpus(), FakeCluster(capacity=8)
    out = rg.hold_gpus(3, 600, fake.request, fake.cluster_gpus, sleep=fake.sleep, clock=fake.clock, poll_s=10)
    assert fake.requests == [[{"GPU": 1}] * 3]
    assert out["requested"] == 3 and out["gpus"] == 3 and out["seconds"] == 20.0


def test_request_gpus_zero_withdraws_and_returns_at_once():
    rg, fake = load_request_gpus(), FakeCluster(capacity=8)
    out = rg.hold_gpus(0, 600, fake.request, fake.cluster_gpus, sleep=fake.sleep, clock=fake.clock)
    assert fake.requests == [[]] and out == {"requested": 0, "gpus": 0.0, "seconds": 0.0}


def test_request_gpus_times_out_when_capacity_never_arrives():
    rg, fake = load_request_gpus(), FakeCluster(capacity=2)
    with pytest.raises(TimeoutError, match="2 of 4 GPUs"):
        rg.hold_gpus(4, 100, fake.request, fake.cluster_gpus, sleep=fake.sleep, clock=fake.clock, poll_s=10)
    assert fake.now == 100
    with pytest.raises(ValueError):
        rg.hold_gpus(-1, 10, fake.request, fake.cluster_gpus)
