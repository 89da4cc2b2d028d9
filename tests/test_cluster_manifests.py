"""Consistency of the cluster and infrastructure files (cluster/, infra/, the Serve configs in
serve_apps/) with each other and with the repo.

No cluster and no network: every YAML under cluster/ and infra/ is parsed (all documents) and checked
for the mistakes that only show up once a job is submitted or an application deployed: a command
naming a file that does not exist, versions that differ from the pins in pyproject.toml, GPU groups
whose Ray resources do not match what the pods get, env vars taken from Secret keys that do not exist,
a Service that does not reach its Deployment, an MLflow URL that the server would refuse, a Serve
config that Ray would reject or silently read differently, or that names an application or a
deployment the code does not define.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import REPO

ROOT = REPO
MANIFEST_DIRS = (ROOT / "cluster", ROOT / "infra")
RAYJOB = ROOT / "cluster/kuberay/irgl-rayjob.yaml"
EVAL_RAYJOB = ROOT / "cluster/kuberay/eval-rayjob.yaml"
RAYJOBS = (RAYJOB, EVAL_RAYJOB)
AUTOSCALER = ROOT / "cluster/autoscaler/irgl-aws.yaml"
MLFLOW = ROOT / "infra/mlflow/mlflow.yaml"
DOCKERFILE = ROOT / "infra/docker/Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "infra/docker/mlflow.Dockerfile"
RAYSERVICE = ROOT / "cluster/kuberay/irg-rayservice.yaml"
SERVE_CONFIG = ROOT / "serve_apps/config.yaml"  # `serve run`, one machine, CPU
SERVE_CONFIG_GPU = ROOT / "serve_apps/config.gpu.yaml"  # `serve deploy` / the RayService, GPUs
GPU = "nvidia.com/gpu"

# GPUs of the EC2 instance types a GPU node type may use (the autoscaler's {"GPU": n} must match).
GPUS_PER_INSTANCE = {
    "p5.48xlarge": 8,
    "p5e.48xlarge": 8,
    "p5en.48xlarge": 8,
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
}
# vCPUs of those types (what Ray detects when a node type does not set "CPU").
CPUS_PER_INSTANCE = {
    "p5.48xlarge": 192,
    "p5e.48xlarge": 192,
    "p5en.48xlarge": 192,
    "p4d.24xlarge": 96,
    "p4de.24xlarge": 96,
}

# Fields of the KubeRay ray.io/v1 types that we may write. An unknown (misspelt) field is dropped
# silently by the API server's pruning, e.g. `shutdownAfterJobFinished: true` would keep the cluster.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "upgradeStrategy",
    "authOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
}
RAYSERVICE_SPEC_FIELDS = {
    "rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
    "serveService", "gateway", "httpRoute", "upgradeStrategy", "serveConfigV2", "rayClusterConfig",
    "excludeHeadPodFromServeSvc",
}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}


# --- loading -----------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for d in MANIFEST_DIRS for p in d.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _load(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() for d in _load(p) if isinstance(d, dict) and "kind" in d]


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _k8s_objects() if d["kind"] == kind]


def _only(kind: str, path: Path) -> dict:
    objs = [d for p, d in _of_kind(kind) if p == path]
    assert len(objs) == 1, f"expected one {kind} in {path.relative_to(ROOT)}, found {len(objs)}"
    return objs[0]


def _pins() -> dict[str, str]:
    """Exact (==) pins of pyproject.toml's dependencies and optional dependencies, by distribution name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _requires_python_min() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m, f"unexpected requires-python {spec!r}"
    return int(m.group(1)), int(m.group(2))


def _dockerfile(path: Path) -> dict:
    """ARG defaults, the FROM image (ARGs substituted) and the last WORKDIR of a simple Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args, image, workdir = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"ARG\s+(\w+)=(\S+)", line):
            args[m.group(1)] = m.group(2).strip("\"'")
        elif m := re.match(r"FROM\s+(\S+)", line, re.IGNORECASE):
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda v: args[v.group(1) or v.group(2)], m.group(1))
        elif m := re.match(r"WORKDIR\s+(\S+)", line):
            workdir = m.group(1)
    return {"args": args, "image": image, "workdir": workdir, "text": text}


# --- pods and containers -----------------------------------------------------------------------


def _ray_cluster(obj: dict) -> dict:
    """The RayCluster spec of a RayJob or a RayService."""
    return obj["spec"]["rayClusterSpec" if obj["kind"] == "RayJob" else "rayClusterConfig"]


def _ray_pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(label, pod template) of the head, each worker group and, for a RayJob, the submitter of a
    RayJob or RayService."""
    spec = obj["spec"]
    cluster = _ray_cluster(obj)
    pods = [("head", cluster["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(("submitter", spec["submitterPodTemplate"]))
    return pods


def _ray_pods(obj: dict) -> list[tuple[str, dict]]:
    """(label, pod spec) of each of _ray_pod_templates."""
    return [(label, template["spec"]) for label, template in _ray_pod_templates(obj)]


def _pod_specs() -> list[tuple[str, str, dict]]:
    """(where, namespace, pod spec) of every pod the manifests create."""
    out = []
    for path, obj in _k8s_objects():
        ns = obj["metadata"].get("namespace", "default")
        where = f"{path.relative_to(ROOT)}: {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((where, ns, obj["spec"]["template"]["spec"]))
        elif obj["kind"] in ("RayJob", "RayService"):
            out += [(f"{where} ({label})", ns, pod) for label, pod in _ray_pods(obj)]
        elif obj["kind"] == "Pod":
            out.append((where, ns, obj["spec"]))
    return out


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert m and m.group(2) in _UNITS, f"cannot read quantity {quantity!r}"
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _entrypoint_argv(command: str) -> list[str]:
    """The `python SCRIPT ...` part of a command line (after `--` when it is a `ray job submit`)."""
    argv = shlex.split(command)
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    return argv


def _assert_job_command(argv: list[str], where: str) -> None:
    assert argv[:1] == ["python"] and len(argv) >= 2, f"{where}: expected `python SCRIPT ...`, got {argv}"
    script = ROOT / argv[1]
    assert argv[1].startswith("jobs/") and script.is_file(), f"{where}: {argv[1]} is not a file in the repository"
    assert "--config" in argv, f"{where}: no --config in {argv}"
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"{where}: config {config} is not a file in the repository"


def _stage_configs(argv: list[str]) -> list:
    """The TrainConfig of each stage a job command runs, as the job itself loads it (config file,
    its stages entry, then the --set and --name overrides)."""
    from irg.train.config import load_config

    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    if "--name" in argv:
        overrides.append(f"run.name={argv[argv.index('--name') + 1]}")
    stages = [int(argv[argv.index("--stage") + 1])] if "--stage" in argv else [1, 2]
    config = ROOT / argv[argv.index("--config") + 1]
    return [load_config(config, stage, overrides) for stage in stages]


def _assert_training_fits(argv: list[str], nodes: list[tuple[int, float, int]], where: str) -> None:
    """Each stage's Ray Train workers fit the GPU nodes, given as (GPUs, CPUs, max count) per node type."""
    for cfg in _stage_configs(argv):
        scaling = cfg.scaling
        stage = f"{where}, stage {cfg.stage}"
        assert scaling.use_gpu, f"{stage}: scaling.use_gpu is false on a GPU cluster"
        gpus = float(scaling.resources_per_worker.get("GPU", 1))
        cpus = float(scaling.resources_per_worker.get("CPU", 1))
        # Workers a node holds: limited by its GPUs and by its CPUs.
        per_node = [(min(int(g // gpus), int(c // cpus)), count) for g, c, count in nodes if g]
        capacity = sum(n * count for n, count in per_node)
        assert 1 <= scaling.num_workers <= capacity, (
            f"{stage}: {scaling.num_workers} workers x {gpus:g} GPU, {cpus:g} CPU; the GPU nodes hold {capacity}"
        )
        # The cluster sets MLFLOW_TRACKING_URI; a tracking_uri in the config would override it.
        assert cfg.tracking.tracking_uri is None, f"{stage}: tracking.tracking_uri overrides the cluster's MLflow"


def _header_commands(path: Path, prefix: str = "ray ") -> list[str]:
    """Shell commands starting with `prefix` in a file's leading comment block (`#   cmd \\`
    continuations joined)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    commands, current = [], ""
    for line in lines:
        current += line
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
        else:
            commands.append(current)
            current = ""
    return [c for c in commands if c.startswith(prefix)]


# --- tests: files --------------------------------------------------------------------------------


def test_every_manifest_parses():
    files = _yaml_files()
    for expected in (RAYJOB, RAYSERVICE, AUTOSCALER, MLFLOW, ROOT / "infra/k8s/object-store-secret.example.yaml"):
        assert expected in files, f"missing {expected.relative_to(ROOT)}"
    for path in files:
        docs = _load(path)
        assert docs, f"{path.relative_to(ROOT)} has no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.relative_to(ROOT)}: a document is not a mapping"
            if "kind" in doc:
                assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), (
                    f"{path.relative_to(ROOT)}: {doc['kind']} without apiVersion or metadata.name"
                )


def test_versions_match_pyproject_pins():
    pins = _pins()
    job = _only("RayJob", RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"], "rayVersion differs from the ray pin"
    service = _only("RayService", RAYSERVICE)
    assert service["apiVersion"] == "ray.io/v1"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == pins["ray"], \
        "RayService rayVersion differs from the pin"

    image = _dockerfile(DOCKERFILE)
    repo, _, tag = image["image"].partition(":")
    assert repo == "rayproject/ray" and tag.startswith(pins["ray"] + "-"), (
        f"base image {image['image']} is not Ray {pins['ray']}"
    )
    m = re.search(r"-py(\d)(\d+)", tag)
    assert m and (int(m.group(1)), int(m.group(2))) >= _requires_python_min(), f"{tag}: Python below requires-python"
    assert "gpu" in tag or "-cu" in tag, f"{tag} is not a CUDA image"
    assert image["args"]["TORCH_VERSION"] == pins["torch"], "Dockerfile torch differs from the torch pin"
    assert "pip install -e '.[cluster]'" in image["text"], "the image does not install the repository"
    assert re.search(r"RUN .*--index-url \"?\$\{?TORCH_INDEX_URL", image["text"]), "torch is not from TORCH_INDEX_URL"

    # The tracking server runs the clients' MLflow version (client/server protocol and DB schema).
    server = _dockerfile(MLFLOW_DOCKERFILE)
    assert server["args"]["MLFLOW_VERSION"] == pins["mlflow"]
    deployment = _only("Deployment", MLFLOW)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].rpartition(":")[2] == pins["mlflow"], "MLflow image tag differs from the mlflow pin"


def test_one_image_for_every_ray_node():
    ray_objects = [_only("RayJob", RAYJOB), _only("RayService", RAYSERVICE)]
    images = {c["image"] for obj in ray_objects for _, pod in _ray_pods(obj) for c in pod["containers"]}
    assert len(images) == 1, f"Ray pods use different images: {images}"
    docker = yaml.safe_load(AUTOSCALER.read_text())["docker"]
    launcher = {docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    assert launcher == images, f"the cluster launcher uses {launcher}, the KubeRay pods {images}"


# --- tests: the RayJob ---------------------------------------------------------------------------


def _check_cluster_fields(cluster: dict) -> None:
    """A RayCluster spec (inside a RayJob or RayService) uses only fields KubeRay knows."""
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, f"unknown fields {set(cluster) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        unknown = set(group) - WORKER_GROUP_FIELDS
        assert not unknown, f"{group['groupName']}: unknown fields {unknown}"
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_fields_are_known_to_kuberay(path):
    job = _only("RayJob", path)
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    cluster = spec["rayClusterSpec"]
    _check_cluster_fields(cluster)
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    assert cluster["enableInTreeAutoscaling"] is True
    # KubeRay passes rayStartParams to `ray start` as strings; a YAML number would be rejected.
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams {key}: {value!r} must be a string"
    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(names) == len(set(names)), f"duplicate worker group names {names}"


def test_rayjob_entrypoint_runs_repo_files_from_the_repo_root():
    job = _only("RayJob", RAYJOB)
    argv = _entrypoint_argv(job["spec"]["entrypoint"])
    _assert_job_command(argv, "RayJob entrypoint")
    # Relative paths resolve against the job's working_dir: the repository inside the image.
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile(DOCKERFILE)["workdir"], (
        "runtimeEnvYAML working_dir is not where the Dockerfile puts the repository"
    )
    # A local working_dir is uploaded by the submitter pod; HTTPMode has none to upload it.
    assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_eval_rayjob_entrypoint_parses_and_its_actors_fit_the_gpus():
    """The evaluation job's arguments as jobs/evaluate.py reads them; its generators and scorer (one
    GPU each, scorer after generation) fit the GPU group; the detector folders are on the mounted volume."""
    import importlib.util

    job = _only("RayJob", EVAL_RAYJOB)
    argv = _entrypoint_argv(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/evaluate.py"]
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(argv[2:])
    cfg = module.config_from_args(args)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == _dockerfile(DOCKERFILE)["workdir"]
    cluster = _ray_cluster(job)
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0)) * g["maxReplicas"]
               for g in cluster["workerGroupSpecs"])
    assert cfg.workers <= gpus and (cfg.scorer.gpus * cfg.score_workers) <= gpus
    mounts = {m["mountPath"] for g in cluster["workerGroupSpecs"]
              for m in g["template"]["spec"]["containers"][0].get("volumeMounts", [])}
    for folder in (cfg.scorer.detector, cfg.scorer.color_classifier):
        assert any(folder.startswith(m.rstrip("/") + "/") for m in mounts), f"{folder} is not on a mounted volume"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_head_runs_no_tasks(path):
    head = _only("RayJob", path)["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    for container in head["template"]["spec"]["containers"]:
        assert GPU not in container.get("resources", {}).get("limits", {}), "the head requests a GPU"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_gpu_groups_match_their_ray_resources(path):
    _assert_gpu_groups_match_their_ray_resources(_ray_cluster(_only("RayJob", path)))


def _assert_gpu_groups_match_their_ray_resources(cluster: dict) -> None:
    gpu_groups = 0
    for group in cluster["workerGroupSpecs"]:
        name, pod, params = group["groupName"], group["template"]["spec"], group.get("rayStartParams", {})
        ray_container = pod["containers"][0]  # KubeRay runs Ray in the first container
        limits = ray_container.get("resources", {}).get("limits", {})
        requests = ray_container.get("resources", {}).get("requests", {})
        gpus = int(limits.get(GPU, 0))
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (
            f"{name}: replicas outside [minReplicas, maxReplicas]"
        )
        if not gpus:
            assert GPU not in requests, f"{name}: GPU requested but not limited"
            assert params.get("num-gpus", "0") == "0", f"{name}: num-gpus without GPUs in the pod"
            continue
        gpu_groups += 1
        # Extended resources: a request, if given, must equal the limit (else the pod is rejected).
        assert int(requests.get(GPU, gpus)) == gpus, f"{name}: {GPU} request differs from the limit"
        assert int(params.get("num-gpus", gpus)) == gpus, f"{name}: num-gpus differs from {GPU}"
        assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), f"{name}: no toleration for {GPU} taints"
        # /dev/shm: Ray's object store and NCCL need far more than the container default of 64 MiB.
        mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{name}: no /dev/shm volume"
        (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm is not a memory emptyDir"
        shm = _bytes(volume["emptyDir"]["sizeLimit"])
        assert 2**30 <= shm < _bytes(limits["memory"]), f"{name}: /dev/shm must be >= 1Gi and below the memory limit"
    assert gpu_groups >= 1, "no worker group requests GPUs"


def _cpus(quantity) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_rayjob_training_workers_fit_the_gpu_groups():
    job = _only("RayJob", RAYJOB)
    nodes = []
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        cpus = _cpus(params.get("num-cpus", limits["cpu"]))
        nodes.append((int(limits.get(GPU, 0)), cpus, group["maxReplicas"]))
    _assert_training_fits(_entrypoint_argv(job["spec"]["entrypoint"]), nodes, "RayJob entrypoint")


# --- tests: secrets, env, MLflow -----------------------------------------------------------------


def _example_secrets() -> dict[tuple[str, str], set[str]]:
    out = {}
    for path, obj in _of_kind("Secret"):
        assert path.name.endswith(".example.yaml"), f"{path.relative_to(ROOT)}: Secrets belong in *.example.yaml"
        keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
        out[(obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])] = keys
    return out


def test_example_secrets_hold_no_real_keys():
    for path, obj in _of_kind("Secret"):
        values = {**(obj.get("data") or {}), **(obj.get("stringData") or {})}
        for key, value in values.items():
            if any(word in key.upper() for word in ("SECRET", "ACCESS_KEY", "PASSWORD", "TOKEN")):
                assert "REPLACE_ME" in str(value), f"{path.relative_to(ROOT)}: {key} is not a placeholder"
        assert "never commit" in path.read_text().lower(), f"{path.relative_to(ROOT)}: no warning against committing"


def test_env_from_secrets_names_keys_of_the_example_secrets():
    secrets = _example_secrets()
    assert ("irg", "irg-object-store") in secrets
    assert secrets[("irg", "irg-object-store")] >= {
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "IRG_BUCKET",
    }, "the object-store Secret lacks a variable irg.storage.StoreConfig reads"
    refs = 0
    for where, ns, pod in _pod_specs():
        for container in _containers(pod):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                refs += 1
                # An optional ref to a missing key silently leaves the variable unset: check those too.
                assert (ns, ref["name"]) in secrets, f"{where}: {env['name']} from unknown Secret {ns}/{ref['name']}"
                assert ref["key"] in secrets[(ns, ref["name"])], (
                    f"{where}: {env['name']} from key {ref['key']!r}, not in Secret {ref['name']}"
                )
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    refs += 1
                    assert (ns, source["secretRef"]["name"]) in secrets, f"{where}: envFrom unknown Secret"
    assert refs, "no container takes anything from a Secret"


def test_ray_pods_get_the_object_store_and_mlflow():
    for obj in (_only("RayJob", RAYJOB), _only("RayService", RAYSERVICE)):
        for label, pod in _ray_pods(obj):
            if label == "submitter":
                continue
            names = {e["name"] for e in pod["containers"][0].get("env", [])}
            missing = {"AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                       "AWS_DEFAULT_REGION", "IRG_BUCKET", "MLFLOW_TRACKING_URI"} - names
            assert not missing, f"{obj['kind']} {label}: no {sorted(missing)} in the Ray container's env"


def test_dependent_env_references_are_defined():
    """Kubernetes expands $(VAR) in command, args and env values only for variables the container
    defines (in env values: earlier in the list); anything else stays literally "$(VAR)"."""
    for where, _, pod in _pod_specs():
        for container in _containers(pod):
            env = container.get("env", [])
            names = [e["name"] for e in env]
            for text in [*container.get("command", []), *container.get("args", [])]:
                for var in re.findall(r"(?<!\$)\$\((\w+)\)", str(text)):
                    assert var in names, f"{where}: {text!r} uses $({var}), which the container does not define"
            for i, e in enumerate(env):
                for var in re.findall(r"(?<!\$)\$\((\w+)\)", str(e.get("value", ""))):
                    assert var in names[:i], f"{where}: {e['name']} uses $({var}) before it is defined"


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_mlflow_service_reaches_the_server_port():
    deployment, service = _only("Deployment", MLFLOW), _only("Service", MLFLOW)
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selects no pod"
    assert service["spec"]["selector"].items() <= labels.items(), "Service selector matches no MLflow pod"
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    (container,) = template["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    args = [*container.get("command", []), *container.get("args", [])]
    assert args[:2] == ["mlflow", "server"]
    server_port = int(_flag(args, "--port") or 5000)
    assert server_port in ports.values(), f"mlflow server listens on {server_port}, not a containerPort {ports}"
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        target = ports.get(target) if isinstance(target, str) else target
        assert target == server_port, f"Service port {port['port']} targets {port.get('targetPort')}, not {server_port}"
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    probe_port = ports.get(probe["port"]) if isinstance(probe["port"], str) else probe["port"]
    assert probe_port == server_port, "the readiness probe does not hit the server's port"
    # Run data in PostgreSQL from a Secret, artifacts proxied into the object store.
    backend = _flag(args, "--backend-store-uri")
    assert backend and backend.startswith("$("), "--backend-store-uri must come from the environment (a Secret)"
    assert (_flag(args, "--artifacts-destination") or "").startswith("s3://")
    assert "--no-serve-artifacts" not in args


def test_tracking_uri_points_at_the_mlflow_service_and_is_allowed():
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    services = {(obj["metadata"]["namespace"], obj["metadata"]["name"]): obj for _, obj in _of_kind("Service")}
    (container,) = _only("Deployment", MLFLOW)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    allowed_hosts = env.get("MLFLOW_SERVER_ALLOWED_HOSTS")
    allowed = [h.strip() for h in allowed_hosts.split(",")] if allowed_hosts else get_default_allowed_hosts()
    seen = 0
    for where, ns, pod in _pod_specs():
        for c in _containers(pod):
            for e in c.get("env", []):
                if e["name"] != "MLFLOW_TRACKING_URI":
                    continue
                seen += 1
                url = urlsplit(e["value"])
                assert url.scheme == "http" and url.port, f"{where}: {e['value']} is not http://host:port"
                parts = url.hostname.split(".")
                assert len(parts) in (1, 2) or parts[2:] == ["svc", "cluster", "local"] or parts[2:] == ["svc"], (
                    f"{where}: {url.hostname} is not an in-cluster Service name"
                )
                key = (parts[1] if len(parts) > 1 else ns, parts[0])
                assert key in services, f"{where}: no Service {key[1]} in namespace {key[0]}"
                assert url.port in [p["port"] for p in services[key]["spec"]["ports"]], f"{where}: port {url.port}"
                # The server checks the Host header; the default allows only localhost and private IPs.
                assert is_allowed_host_header(allowed, url.netloc), f"{where}: MLflow would refuse Host {url.netloc}"
    assert seen, "no pod sets MLFLOW_TRACKING_URI"


# --- tests: the Ray cluster launcher config ------------------------------------------------------


def test_autoscaler_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(AUTOSCALER.read_text())
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    validate_config(prepare_config(copy.deepcopy(config)))


def test_autoscaler_node_types():
    config = yaml.safe_load(AUTOSCALER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "tasks would be scheduled on the head"
    assert not head["resources"].get("GPU")
    gpu_types = 0
    for name, node in types.items():
        if name == config["head_node_type"]:
            continue
        instance = node["node_config"]["InstanceType"]
        gpus = node.get("resources", {}).get("GPU", 0)
        if instance in GPUS_PER_INSTANCE or gpus:
            gpu_types += 1
            expected = GPUS_PER_INSTANCE.get(instance)
            assert gpus == expected, f"{name}: resources GPU {gpus}, but {instance} has {expected} GPUs"
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"]
    assert gpu_types >= 1, "no GPU node type"
    total = sum(node["max_workers"] for name, node in types.items() if name != config["head_node_type"])
    assert total <= config["max_workers"], "the cluster's max_workers stops the node types reaching their maxima"


def test_autoscaler_installs_the_mounted_repo():
    config = yaml.safe_load(AUTOSCALER.read_text())
    mounts = config["file_mounts"]
    repo_dirs = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert len(repo_dirs) == 1, f"file_mounts should mount the repository ('.') once: {mounts}"
    (repo_dir,) = repo_dirs
    assert repo_dir == _dockerfile(DOCKERFILE)["workdir"], "the repository mount is not where the image has it"
    commands = " && ".join(config["setup_commands"])
    assert f"cd {repo_dir}" in commands and "pip install -e '.[cluster]'" in commands, (
        "setup_commands do not install the mounted repository"
    )
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_autoscaler_header_commands_reference_repo_files():
    commands = _header_commands(AUTOSCALER)
    ups = [c for c in commands if c.startswith("ray up ")]
    assert ups and all(shlex.split(c)[2] == str(AUTOSCALER.relative_to(ROOT)) for c in ups), ups
    submits = [c for c in commands if c.startswith("ray job submit ")]
    assert submits, "the header shows no `ray job submit`"
    config = yaml.safe_load(AUTOSCALER.read_text())
    nodes = [
        (
            node["resources"].get("GPU", 0),
            node["resources"].get("CPU", CPUS_PER_INSTANCE.get(node["node_config"]["InstanceType"], 0)),
            node.get("max_workers", 0),
        )
        for node in config["available_node_types"].values()
    ]
    for command in submits:
        argv = shlex.split(command)
        assert argv[argv.index("--working-dir") + 1] == ".", "jobs must be submitted from the repository root"
        job = _entrypoint_argv(command)
        _assert_job_command(job, "autoscaler header")
        _assert_training_fits(job, nodes, "autoscaler header")


# --- tests: Ray Serve (serve_apps/ configs and the RayService) ------------------------------------


def _serve_configs() -> dict[str, dict]:
    """Every Serve config, by where it is: the two files and the RayService's serveConfigV2."""
    service = _only("RayService", RAYSERVICE)
    text = service["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string (a mapping is rejected by the CRD)"
    return {
        str(SERVE_CONFIG.relative_to(ROOT)): yaml.safe_load(SERVE_CONFIG.read_text()),
        str(SERVE_CONFIG_GPU.relative_to(ROOT)): yaml.safe_load(SERVE_CONFIG_GPU.read_text()),
        f"{RAYSERVICE.relative_to(ROOT)}: serveConfigV2": yaml.safe_load(text),
    }


def _assert_known_fields(obj: dict, model, where: str) -> None:
    # Ray's schemas ignore unknown fields: a misspelt option would be dropped without a word.
    unknown = set(obj) - set(model.model_fields)
    assert not unknown, f"{where}: {sorted(unknown)} unknown to Ray's {model.__name__}"


def _deployment(app: dict, name: str) -> dict:
    found = [d for d in app.get("deployments", []) if d["name"] == name]
    assert len(found) == 1, f"application {app['name']}: expected one deployment {name}, found {len(found)}"
    return found[0]


def _single_app(config: dict, where: str) -> dict:
    assert len(config["applications"]) == 1, f"{where}: expected the one application"
    return config["applications"][0]


def _import_module_and_attr(import_path: str) -> tuple[str, str]:
    module, sep, attr = import_path.partition(":")
    return (module, attr) if sep else tuple(import_path.rsplit(".", 1))


def _module_file(module: str) -> Path:
    path = ROOT / module.replace(".", "/")
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def _serve_deployment_classes(source: str) -> set[str]:
    """Names of the top-level classes decorated with @serve.deployment (the decorator may span lines)."""
    names, decorated = set(), False
    for line in source.splitlines():
        if line.startswith("@serve.deployment"):
            decorated = True
        elif m := re.match(r"(?:async\s+)?(class|def)\s+(\w+)", line):
            if decorated and m.group(1) == "class":
                names.add(m.group(2))
            decorated = False
    return names


def test_serve_configs_are_valid_for_ray():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    for where, config in _serve_configs().items():
        ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` / KubeRay's PUT do first
        _assert_known_fields(config, ServeDeploySchema, where)
        _assert_known_fields(config.get("http_options") or {}, HTTPOptionsSchema, f"{where}: http_options")
        for app in config["applications"]:
            _assert_known_fields(app, ServeApplicationSchema, f"{where}: {app['name']}")
            for d in app.get("deployments", []):
                at = f"{where}: {app['name']}/{d['name']}"
                _assert_known_fields(d, DeploymentSchema, at)
                _assert_known_fields(d.get("ray_actor_options") or {}, RayActorOptionsSchema, f"{at} ray_actor_options")
                autoscaling = d.get("autoscaling_config")
                if autoscaling is None:
                    continue
                # ServeDeploySchema keeps autoscaling_config as a plain dict; the controller builds this
                # (and rejects e.g. min_replicas > max_replicas) only at deploy time.
                _assert_known_fields(autoscaling, AutoscalingConfig, f"{at} autoscaling_config")
                scaling = AutoscalingConfig(**autoscaling)
                # A replica never reports more ongoing requests than it accepts: a target above that
                # would never be reached, and the deployment would never scale up.
                max_ongoing = d.get("max_ongoing_requests")
                assert max_ongoing is None or scaling.target_ongoing_requests <= max_ongoing, (
                    f"{at}: target_ongoing_requests {scaling.target_ongoing_requests} "
                    f"> max_ongoing_requests {max_ongoing}"
                )


def test_serve_configs_name_the_app_builder_and_its_deployments():
    from pydantic import ValidationError

    from irg.serve.options import AppArgs, BatchOptions

    for where, config in _serve_configs().items():
        for app in config["applications"]:
            module, attr = _import_module_and_attr(app["import_path"])
            path = _module_file(module)
            # Checked by reading the file: importing it would need torch, FastAPI and the model code.
            assert path.is_file(), f"{where}: import_path {app['import_path']}: no {path.relative_to(ROOT)}"
            source = path.read_text()
            assert re.search(rf"^(?:def\s+{attr}\s*\(|{attr}\s*=)", source, re.MULTILINE), (
                f"{where}: {path.relative_to(ROOT)} defines no top-level {attr}"
            )
            classes = _serve_deployment_classes(source)
            for d in app.get("deployments", []):
                assert d["name"] in classes, (
                    f"{where}: deployment {d['name']} is not a @serve.deployment class of {path.relative_to(ROOT)}"
                    f" ({sorted(classes)}); Ray rejects options for a deployment the application lacks"
                )
            # Serve validates the args against the builder's pydantic annotation (AppArgs) before it
            # builds anything, and the call-at-a-time Generator's reconfigure its user_config against
            # BatchOptions.
            assert re.search(r"^def \w+\(args: AppArgs\) -> Application:", source, re.MULTILINE), \
                f"{where}: {path.relative_to(ROOT)} has no builder typed with AppArgs"
            try:
                args = AppArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                pytest.fail(f"{where}: args: {e}")
            generator = _deployment(app, "Generator")
            max_ongoing = generator.get("max_ongoing_requests")
            if args.scheduler == "engine":
                # The engine has no user_config (Serve refuses one for a class without reconfigure),
                # and a replica that accepts fewer requests than its KV slots hold never fills them.
                assert "user_config" not in generator, f"{where}: the engine's Generator takes no user_config"
                prompts = args.kv_slots // 2
                assert max_ongoing is None or max_ongoing >= prompts, \
                    f"{where}: Generator max_ongoing_requests {max_ongoing} < the {prompts} prompts its KV slots hold"
            else:
                try:
                    batching = BatchOptions.model_validate(generator.get("user_config") or {})
                except ValidationError as e:
                    pytest.fail(f"{where}: Generator user_config: {e}")
                # A replica that accepts fewer requests than a batch holds never fills one.
                assert max_ongoing is None or max_ongoing >= batching.max_batch_size, \
                    f"{where}: Generator max_ongoing_requests {max_ongoing} < max_batch_size {batching.max_batch_size}"
            # A replica on "cuda" needs a GPU reserved for it; one on "cpu" must not hold one.
            gpus = (generator.get("ray_actor_options") or {}).get("num_gpus", 0)
            if args.device.startswith("cuda"):
                assert gpus >= 1, f"{where}: device {args.device} but the Generator reserves no GPU"
            if args.device == "cpu":
                assert gpus == 0, \
                    f"{where}: device cpu but the Generator reserves {gpus} GPU (never starts without one)"


def test_local_serve_config_runs_from_the_repository():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    app = _single_app(config, "config.yaml")
    model = app["args"]["model"]
    # `serve run serve_apps/config.yaml` from the repository root: the model is a folder of the repo.
    assert not model.startswith(("models:/", "s3://", "/")), f"{model}: the local config needs a repository path"
    assert (ROOT / model).is_dir() and any((ROOT / model).iterdir()), f"{model} is not a folder in the repository"
    assert app["args"].get("device") == "cpu", "the local config must run without a GPU"
    assert config["http_options"]["host"] == "127.0.0.1", "the local config must listen on loopback only"
    assert app["import_path"] == yaml.safe_load(SERVE_CONFIG_GPU.read_text())["applications"][0]["import_path"]


def test_gpu_serve_config():
    config = yaml.safe_load(SERVE_CONFIG_GPU.read_text())
    app = _single_app(config, "config.gpu.yaml")
    model = app["args"]["model"]
    assert re.fullmatch(r"models:/[\w.-]+(@[\w-]+|/\d+)", model) or model.startswith("s3://"), (
        f"{model}: a cluster loads a registered model (models:/NAME@ALIAS) or an s3:// checkpoint"
    )
    assert app["args"].get("device") == "cuda"
    generator = _deployment(app, "Generator")
    assert generator["ray_actor_options"].get("num_gpus") == 1, "one GPU per Generator replica"
    # The head runs no tasks (num-cpus 0) and the GPU workers may all be gone (min_replicas 0): the
    # ingress must be placeable on the head, so it must ask for no CPU.
    assert _deployment(app, "Ingress")["ray_actor_options"].get("num_cpus") == 0, "Ingress must ask for 0 CPUs"
    # Pods take traffic from the Kubernetes Service: the proxies must listen on every interface.
    assert config["http_options"]["host"] == "0.0.0.0"
    # Without a working_dir nothing is shipped with the application: every node imports it from what
    # the image installs (`pip install -e '.[cluster]'`), which must then include its module.
    if not (app.get("runtime_env") or {}).get("working_dir"):
        module, _ = _import_module_and_attr(app["import_path"])
        find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        top = module.split(".")[0]
        assert any(fnmatch.fnmatchcase(top, pattern) for pattern in find.get("include", ["*"])), (
            f"pyproject.toml's packages.find does not install {top}: the nodes could not import {app['import_path']}"
        )


def test_served_configs_require_api_keys_from_a_secret():
    """The GPU config and the RayService bind 0.0.0.0: they require keys, and every RayService pod has them."""
    for where, config in _serve_configs().items():
        if config["http_options"]["host"] != "127.0.0.1":
            assert _single_app(config, where)["args"].get("require_api_key") is True, f"{where}: keys not required"
    service = next(obj for _, obj in _of_kind("RayService"))
    pods = [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["IRG_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "irg-serve-api-keys", container["name"]


def test_rayservice_fields_are_known_to_kuberay():
    service = _only("RayService", RAYSERVICE)
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS, f"unknown RayService fields {set(spec) - RAYSERVICE_SPEC_FIELDS}"
    cluster = spec["rayClusterConfig"]
    _check_cluster_fields(cluster)
    # Serve asks for replicas; only the Ray autoscaler turns those into GPU pods.
    assert cluster["enableInTreeAutoscaling"] is True
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams {key}: {value!r} must be a string"
    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(names) == len(set(names)), f"duplicate worker group names {names}"


def test_rayservice_serves_the_gpu_config():
    configs = _serve_configs()
    served = configs[f"{RAYSERVICE.relative_to(ROOT)}: serveConfigV2"]
    gpu = configs[str(SERVE_CONFIG_GPU.relative_to(ROOT))]
    assert served == gpu, f"serveConfigV2 differs from {SERVE_CONFIG_GPU.relative_to(ROOT)}"


def test_rayservice_head_and_serve_ports():
    service = _only("RayService", RAYSERVICE)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "Generator replicas or tasks could land on the head"
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    (ray_head, *_) = head["template"]["spec"]["containers"]
    assert GPU not in ray_head.get("resources", {}).get("limits", {}), "the head requests a GPU"
    ports = {p.get("name"): p["containerPort"] for p in ray_head.get("ports", [])}
    serve_port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    # KubeRay's <name>-serve-svc targets the head's port named "serve".
    assert ports.get("serve") == serve_port, f"head port 'serve' {ports.get('serve')} != http_options.port {serve_port}"
    assert ports.get("dashboard") == 8265 and ports.get("gcs") == 6379, f"head ports {ports}"


def test_rayservice_header_commands():
    service = _only("RayService", RAYSERVICE)
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    serve_port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    commands = [shlex.split(c, comments=True) for c in _header_commands(RAYSERVICE, "kubectl ")]
    applies = [c for c in commands if c[1:3] == ["apply", "-f"]]
    assert applies and all(c[3] == str(RAYSERVICE.relative_to(ROOT)) for c in applies), applies
    assert ["kubectl", "-n", ns, "get", "rayservice", name] in [c[:6] for c in commands], "no `get rayservice`"
    forwards = [c for c in commands if "port-forward" in c and any("serve-svc" in a for a in c)]
    assert forwards, "the header shows no port-forward to the Serve service"
    for c in forwards:
        assert c[1:3] == ["-n", ns], c
        assert f"svc/{name}-serve-svc" in c, f"{c}: KubeRay names the Service {name}-serve-svc"
        remote = int(c[-1].rpartition(":")[2])
        assert remote == serve_port, f"{c}: forwards to {remote}, Serve listens on {serve_port}"


def test_rayservice_gpu_groups_fit_the_generator():
    service = _only("RayService", RAYSERVICE)
    cluster = service["spec"]["rayClusterConfig"]
    _assert_gpu_groups_match_their_ray_resources(cluster)
    app = _single_app(yaml.safe_load(service["spec"]["serveConfigV2"]), "serveConfigV2")
    generator = _deployment(app, "Generator")
    options = generator["ray_actor_options"]
    gpus, cpus = float(options.get("num_gpus", 0)), float(options.get("num_cpus", 1))
    assert gpus == 1, f"the Generator asks for {gpus:g} GPUs, not 1"
    capacity = 0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        pod_gpus = int(params.get("num-gpus", limits.get(GPU, 0)))
        pod_cpus = _cpus(params.get("num-cpus", limits["cpu"]))
        if pod_gpus:
            # Replicas a pod holds: limited by its GPUs and by its CPUs.
            capacity += min(int(pod_gpus // gpus), int(pod_cpus // cpus)) * group["maxReplicas"]
    max_replicas = generator["autoscaling_config"]["max_replicas"]
    assert capacity >= max_replicas, \
        f"the GPU groups hold {capacity} Generator replicas, max_replicas is {max_replicas}"


def test_ray_object_stores_fit_in_dev_shm():
    """A Ray node whose object store exceeds /dev/shm puts it in /tmp (slow) and warns; set
    object-store-memory within the memory emptyDir mounted there."""
    for obj in (_only("RayJob", RAYJOB), _only("RayService", RAYSERVICE)):
        cluster = _ray_cluster(obj)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            store = group.get("rayStartParams", {}).get("object-store-memory")
            if store is None:
                continue
            where = f"{obj['kind']} {obj['metadata']['name']} {group.get('groupName', 'head')}"
            pod = group["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{where}: object-store-memory set but no /dev/shm volume"
            (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mounts["/dev/shm"]]
            shm = _bytes(volume["emptyDir"]["sizeLimit"])
            assert _bytes(store) <= shm, \
                f"{where}: object-store-memory {store} exceeds /dev/shm {volume['emptyDir']['sizeLimit']}"


# --- tests: access control (Ray token auth, MLflow basic-auth, NetworkPolicies, no secrets in runtime_env)


RAY_AUTH_SECRET = ("irg", "irg-ray-auth")
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", re.IGNORECASE)


def _ray_objects() -> list[tuple[Path, dict]]:
    return [(p, o) for p, o in _k8s_objects() if o["kind"] in ("RayJob", "RayService", "RayCluster")]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(env: dict | None) -> tuple[str, str] | None:
    ref = (env or {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def _assert_token_auth(env: dict[str, dict], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
    assert _secret_ref(env.get("RAY_AUTH_TOKEN")) == (RAY_AUTH_SECRET[1], "auth_token"), (
        f"{where}: RAY_AUTH_TOKEN does not come from the Secret {RAY_AUTH_SECRET[1]}"
    )


def test_every_ray_node_uses_token_authentication_from_a_secret():
    """Without it anyone reaching the dashboard (8265) submits a job holding the object-store keys."""
    assert RAY_AUTH_SECRET in _example_secrets(), "no example Secret for the Ray token"
    objects = _ray_objects()
    assert len(objects) >= 3
    for path, obj in objects:
        at = f"{path.relative_to(ROOT)}: {obj['kind']} {obj['metadata']['name']}"
        cluster = _ray_cluster(obj)
        # KubeRay (1.6+) authenticates its own dashboard calls with this Secret: the same as the pods'.
        assert cluster.get("authOptions") == {"mode": "token", "secretName": RAY_AUTH_SECRET[1]}, at
        for label, pod in _ray_pods(obj):
            for container in pod["containers"]:
                _assert_token_auth(_env(container), f"{at} ({label}, {container['name']})")
        _assert_token_auth(_env(cluster.get("autoscalerOptions", {})), f"{at} (autoscaler)")
        head = cluster["headGroupSpec"]["rayStartParams"]
        assert head.get("dashboard-host") in (None, "0.0.0.0"), at  # reachable by the operator, guarded below

    config = yaml.safe_load(AUTOSCALER.read_text())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"], "autoscaler nodes without token auth"
    token = [remote for remote, local in config["file_mounts"].items() if local == "~/.ray/auth_token"]
    assert token == ["/home/ray/.ray/auth_token"], "the token file is not copied where Ray looks for it"
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    host = _flag(shlex.split(head_start.split(";")[-1]), "--dashboard-host")
    assert host in (None, "127.0.0.1", "localhost"), f"the autoscaler's dashboard listens on {host}"


def _runtime_envs() -> list[tuple[str, dict]]:
    """Every runtime_env written down: RayJob runtimeEnvYAML, Serve configs' runtime_env, and each
    `--runtime-env-json '...'` in the manifests, the READMEs and the docs."""
    found = []
    for path, obj in _of_kind("RayJob"):
        runtime_env = yaml.safe_load(obj["spec"].get("runtimeEnvYAML") or "{}")
        found.append((f"{path.relative_to(ROOT)} runtimeEnvYAML", runtime_env))
    for where, config in _serve_configs().items():
        found += [(f"{where}: {a['name']}", a.get("runtime_env") or {}) for a in config["applications"]]
    texts = [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("infra/**/*.md"), *_yaml_files()]
    for path in texts:
        for m in re.finditer(r"--runtime-env-json[= ]'([^']*)'", path.read_text()):
            found.append((f"{path.relative_to(ROOT)}: --runtime-env-json", json.loads(m.group(1))))
    return found


def test_no_secret_in_any_runtime_env():
    """Job and actor details (dashboard, `ray job list`) show runtime_env to anyone: secrets come from
    the pods' secretKeyRef or files on the nodes."""
    envs = _runtime_envs()
    assert any("--runtime-env-json" in where for where, _ in envs), "found no --runtime-env-json to check"
    for where, env in envs:
        secret = [k for k in (env.get("env_vars") or {}) if SECRET_NAME.search(k)]
        assert not secret, f"{where}: {secret} in a runtime_env"


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _allows(policy: dict, port: int, labels: dict, namespace: dict) -> bool:
    """Whether one of the NetworkPolicy's ingress rules admits a pod (labels, namespace labels) on port."""
    own_ns = {"kubernetes.io/metadata.name": policy["metadata"]["namespace"]}
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        if "from" not in rule:
            return True  # a rule without `from` admits everyone
        for peer in rule["from"]:
            # No namespaceSelector: the policy's own namespace only.
            ns_ok = _selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer else (
                namespace == own_ns)
            pod_ok = _selects(peer["podSelector"], labels) if "podSelector" in peer else True
            if ns_ok and pod_ok:
                return True
    return False


def _policies_for(labels: dict, namespace: str) -> list[dict]:
    return [p for _, p in _of_kind("NetworkPolicy")
            if p["metadata"]["namespace"] == namespace and _selects(p["spec"]["podSelector"], labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]


def _admitted(labels: dict, namespace: str, port: int, peer: dict, peer_ns: str) -> bool:
    policies = _policies_for(labels, namespace)
    assert policies, f"no NetworkPolicy selects pods {labels}"
    return any(_allows(p, port, peer, {"kubernetes.io/metadata.name": peer_ns}) for p in policies)


STRANGERS = [({"app": "other"}, "irg"), ({}, "irg"), ({"app": "other"}, "default")]


def test_network_policies_guard_the_ray_heads_and_mlflow():
    for _, obj in _ray_objects():
        ns, cluster = obj["metadata"]["namespace"], _ray_cluster(obj)
        head = cluster["headGroupSpec"]["template"].get("metadata", {}).get("labels", {})
        ports = [6379, 8265, 10001]
        if obj["kind"] == "RayService":
            ports.append(yaml.safe_load(obj["spec"]["serveConfigV2"])["http_options"]["port"])
        for group in cluster["workerGroupSpecs"]:
            worker = group["template"].get("metadata", {}).get("labels", {})
            assert all(_admitted(head, ns, port, worker, ns) for port in ports), f"{group['groupName']} cut off"
        for port in ports:
            for labels, peer_ns in STRANGERS:
                assert not _admitted(head, ns, port, labels, peer_ns), f"{port} open to {labels} in {peer_ns}"
        assert _admitted(head, ns, 8265, {"irg.io/ray-client": "true"}, ns), "labelled clients cannot submit"
        operator = {"app.kubernetes.io/name": "kuberay-operator"}
        assert _admitted(head, ns, 8265, operator, "kuberay-system"), "the KubeRay operator cannot reach 8265"
        if "submitterPodTemplate" in obj["spec"]:
            submitter = obj["spec"]["submitterPodTemplate"].get("metadata", {}).get("labels", {})
            assert _admitted(head, ns, 8265, submitter, ns), "the submitter cannot reach the dashboard"

    mlflow = _only("Deployment", MLFLOW)
    labels, ns = mlflow["spec"]["template"]["metadata"]["labels"], mlflow["metadata"]["namespace"]
    for labels_, peer_ns in STRANGERS:
        assert not _admitted(labels, ns, 5000, labels_, peer_ns), f"MLflow open to {labels_} in {peer_ns}"
    clients = 0
    for path, obj in _ray_objects():
        for label, template in _ray_pod_templates(obj):
            if "MLFLOW_TRACKING_URI" in _env(template["spec"]["containers"][0]):
                clients += 1
                peer = template.get("metadata", {}).get("labels", {})
                assert _admitted(labels, ns, 5000, peer, obj["metadata"]["namespace"]), f"{path.name} {label}"
    assert clients


def test_mlflow_runs_basic_auth_and_clients_sign_in_from_secrets():
    pod = _only("Deployment", MLFLOW)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = [*container.get("command", []), *container.get("args", [])]
    assert _flag(args, "--app-name") == "basic-auth", "MLflow runs without authentication"
    env = _env(container)
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert _secret_ref(env.get(name)), f"the MLflow server's {name} is not from a Secret"
    assert "mlflow[auth]==" in _dockerfile(MLFLOW_DOCKERFILE)["text"], "the MLflow image lacks the auth extra"
    # The users' database must outlive the pod: the auth config names one, from the mounted Secret.
    config_dir = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rpartition("/")[0]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (secret,) = [o for _, o in _of_kind("Secret") if o["metadata"]["name"] == volume["secret"]["secretName"]]
    ini = secret["stringData"]["basic_auth.ini"]
    assert "database_uri = postgresql://" in ini and "default_permission = READ" in ini

    seen = 0
    for where, _, pod in _pod_specs():
        for c in _containers(pod):
            env = _env(c)
            if "MLFLOW_TRACKING_URI" not in env:
                continue
            seen += 1
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert _secret_ref(env.get(name)), f"{where}: {name} is not from a secretKeyRef"
    assert seen
    # Serving only reads the registry: it signs in as its own user, not the jobs' one.
    (serve_head, *_) = _ray_pods(_only("RayService", RAYSERVICE))[0][1]["containers"]
    assert _secret_ref(_env(serve_head)["MLFLOW_TRACKING_USERNAME"])[0] == "mlflow-serve-user"
