"""cluster/kuberay/: every manifest against KubeRay's CRD schema, and what its entry point would run.

Schema: each manifest is validated against the ``openAPIV3Schema`` of its CRD version in ``../shared/kuberay/crds``
(KubeRay at feeaf72f) with jsonschema, *strictly*: where a schema declares ``properties`` and neither
``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``, an undeclared field is an error, as with
``kubectl apply --validate=strict`` (plain JSON-schema validation accepts it, and the API server would prune it: a
misspelled ``maxReplica`` would silently leave the default). Lists that Kubernetes merges by key
(``x-kubernetes-list-map-keys``: env vars, ports, volumes) must not repeat a key. Quantities are
``x-kubernetes-int-or-string`` (``anyOf`` integer | string with a quantity pattern), so ``1`` and ``"28Gi"`` both
pass. Not checked: CEL rules (``x-kubernetes-validations``) and KubeRay's own webhook/controller checks, except the
name lengths. Schema tests skip without ../shared; the entry-point and consistency checks need only this repo.
"""

import ast
import functools
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay" / "crds"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (../shared)")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML: the C loader is ~6x faster

# KubeRay's ValidateRayClusterMetadata / ValidateRayJobMetadata: DNS-1035 labels of at most 53 / 47 characters (the
# cluster of a RayJob is named <job>-<6 chars>; "-serve-svc" must still fit in 63).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, dict]:
    """file name -> its one document."""
    out = {}
    for path in MANIFESTS:
        docs = _docs(path)
        assert len(docs) == 1, f"{path.name}: one resource per file (kubectl apply -f <file> is one step)"
        out[path.name] = docs[0]
    return out


# ------------------------------------------------------------------------------------------------------- schema


@functools.lru_cache(maxsize=None)
def crd_versions() -> dict:
    """(apiVersion, kind) -> the CRD's version entry (served, deprecated, schema.openAPIV3Schema)."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=Loader)
        for v in crd["spec"]["versions"]:
            out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = v
    return out


def _strict(node):
    """The schema with ``additionalProperties: false`` wherever it declares properties and allows nothing else."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: ({name: _strict(s) for name, s in v.items()} if k == "properties" else _strict(v))
           for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map -> the items' key tuples are unique (Kubernetes merges such lists by key)."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    from jsonschema import ValidationError

    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield ValidationError(f"duplicate item with {dict(zip(keys, key))}")
        seen.add(key)


@functools.lru_cache(maxsize=None)
def _validator(api_version: str, kind: str, strict: bool):
    from jsonschema import Draft4Validator, validators  # OpenAPI v3.0 schemas are (nearly) JSON-schema draft 4

    schema = crd_versions()[(api_version, kind)]["schema"]["openAPIV3Schema"]
    if not strict:  # the CRD schema as plain JSON schema
        return Draft4Validator(schema)
    schema = _strict(schema)  # a new tree: the cached CRD stays as it is
    # The CRD leaves the object's metadata to the API server (ObjectMeta): the fields a manifest may set.
    schema["properties"]["metadata"] = {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                                "maxLength": NAME_LIMITS.get(kind, 63)},
                       "namespace": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    return validators.extend(Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})(schema)


def manifest_errors(doc: dict, strict: bool = True) -> list[str]:
    """Schema errors of one manifest, as 'path: message'; [] when it is valid. ``strict=False``: only what the CRD
    schema says as plain JSON schema (unknown fields pass, repeated list keys pass, metadata unchecked)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    entry = crd_versions().get(key)
    if entry is None:
        return [f"no CRD for apiVersion={key[0]!r} kind={key[1]!r} (have {sorted(crd_versions())})"]
    if entry.get("deprecated") or not entry.get("served", True):
        return [f"{key[0]} is deprecated or not served; use the storage version"]
    errors = _validator(*key, strict).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_there_are_manifests_for_the_cluster_the_job_and_the_sweep():
    kinds = sorted((d["kind"], n) for n, d in manifests().items())
    assert kinds == [("RayCluster", "raycluster.yaml"), ("RayJob", "rayjob-paper.yaml"),
                     ("RayJob", "rayjob-sweep.yaml")], kinds


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_fits_the_crd_schema_strictly(path):
    for doc in _docs(path):
        assert manifest_errors(doc) == [], path.name


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _gpu_group(doc: dict) -> dict:
    (group,) = [g for g in _cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


def _parent(doc: dict, path: str):
    """(the node holding a dotted path's last part, that part); list indices are numbers."""
    *parents, last = path.split(".")
    for p in parents:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, int(last) if isinstance(doc, list) else last


def _set(path: str, value):
    """A mutation of a manifest: set ``path`` to ``value``."""
    def apply(doc):
        node, key = _parent(doc, path)
        node[key] = value
    return apply


def _rename(path: str, new: str):
    """A mutation of a manifest: rename the field at ``path`` to ``new`` (a misspelling)."""
    def apply(doc):
        node, key = _parent(doc, path)
        node[new] = node.pop(key)
    return apply


HEAD = "spec.headGroupSpec.template.spec.containers.0"
WORKER = "spec.workerGroupSpecs.0.template.spec.containers.0"


# name -> (file, mutation, words expected in an error, whether plain (non-strict) validation misses it)
BROKEN = {
    "misspelled worker-group field": ("raycluster.yaml", _rename("spec.workerGroupSpecs.0.replicas",
                                                                 "replica"), ["replica"], True),
    "misspelled container field": ("raycluster.yaml", _rename(f"{HEAD}.workingDir", "workingDirectory"),
                                   ["workingDirectory"], True),
    "misspelled top-level spec field": ("rayjob-paper.yaml", _rename("spec.entrypoint", "entryPoint"),
                                        ["entryPoint"], True),
    "misspelled metadata field": ("raycluster.yaml", _set("metadata.lables", {"a": "b"}), ["lables"], True),
    "RayJob name longer than KubeRay allows": ("rayjob-paper.yaml", _set("metadata.name", "m" * 48),
                                               ["too long"], True),
    "duplicate env var": ("raycluster.yaml", _set(f"{WORKER}.env", [{"name": "MEDVQA_RUNS_BASE", "value": "a"},
                                                                     {"name": "MEDVQA_RUNS_BASE", "value": "b"}]),
                          ["duplicate"], True),
    "string where an integer goes": ("raycluster.yaml", _set("spec.workerGroupSpecs.0.minReplicas", "0"),
                                     ["minReplicas", "integer"], False),
    "not a quantity": ("raycluster.yaml", _set(f"{WORKER}.resources.limits.memory", "lots"), ["memory"], False),
    "auth mode not in the enum": ("raycluster.yaml", _set("spec.authOptions.mode", "tokens"), ["tokens"], False),
    "deprecated CRD version": ("raycluster.yaml", _set("apiVersion", "ray.io/v1alpha1"), ["deprecated"], False),
}


@needs_crds
@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_manifest_is_rejected(case):
    name, mutate, words, lenient_misses = BROKEN[case]
    doc = manifests()[name]  # read afresh: free to mutate
    mutate(doc)
    errors = "\n".join(manifest_errors(doc))
    assert errors, f"{case}: not caught"
    for word in words:
        assert word in errors, errors
    if lenient_misses:  # why the strict mode exists: the CRD schema alone accepts this
        assert manifest_errors(doc, strict=False) == []


@needs_crds
def test_quantities_take_ints_or_strings():
    doc = manifests()["raycluster.yaml"]
    limits = _gpu_group(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits.update({"cpu": 7, "memory": "30064771072", "nvidia.com/gpu": "1"})
    assert manifest_errors(doc) == []
    limits["cpu"] = 7.5  # a YAML float is neither: write "7500m" or "7.5"
    assert manifest_errors(doc)


# ----------------------------------------------------------------------------------- consistency with the repo


def test_rayjobs_carry_the_rayclusters_spec():
    docs = manifests()
    for name in ("rayjob-paper.yaml", "rayjob-sweep.yaml"):
        assert docs[name]["spec"]["rayClusterSpec"] == docs["raycluster.yaml"]["spec"], \
            f"{name}: rayClusterSpec differs from raycluster.yaml's spec; keep the copies identical"


def _dockerfile() -> tuple[str, str, set[str]]:
    """The base image, WORKDIR and the top-level paths COPY'd from the repository."""
    base = workdir = None
    copied = set()
    for line in (KUBERAY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            base = words[1]
        elif words[:1] == ["WORKDIR"]:
            workdir = words[1]
        elif words[:1] == ["COPY"]:
            copied.update(w for w in words[1:-1] if not w.startswith("--"))
    return base, workdir, copied


def test_cluster_shape_auth_and_storage():  # the RayJobs carry the same spec (tested above)
    doc = manifests()["raycluster.yaml"]
    spec = doc["spec"]
    ray_version = version("ray")
    assert spec["rayVersion"] == ray_version, "rayVersion must be the Ray the project runs (and the image's)"
    base, workdir, _ = _dockerfile()
    assert base.startswith(f"rayproject/ray:{ray_version}-py311"), base
    # Token auth from our Secret (KubeRay injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from its key auth_token).
    assert spec["authOptions"] == {"mode": "token", "secretName": "medvqa-ray-token"}
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    gpu = _gpu_group(doc)
    worker = gpu["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(head["resources"]) and "num-gpus" not in spec["headGroupSpec"]["rayStartParams"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["enableInTreeAutoscaling"] and gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    for container in (head, worker):
        assert container["workingDir"] == workdir  # job drivers start where the image has the checkout
        assert {"secretRef": {"name": "medvqa-s3"}} in container["envFrom"]  # S3 credentials / endpoint
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MEDVQA_RUNS_BASE"].startswith("s3://")  # relative run/sweep dirs go to the bucket


def _cli_command(script: Path) -> list[str]:
    """The `medvqa` subcommand an entry script runs: the leading strings of its ``app([...])`` call."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "app" and node.args:
            words = []
            for elt in node.args[0].elts:
                if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)):
                    break
                words.append(elt.value)
            return words
    raise AssertionError(f"{script}: no app([...]) call")


def _parse_entrypoint(entrypoint: str) -> tuple[Path, dict]:
    """``python <script> <args>`` -> (script, the parameters the real CLI parses from those args; nothing runs)."""
    import typer

    from medvqa.cli import app

    words = shlex.split(entrypoint)
    assert words[0] == "python" and len(words) > 1, entrypoint
    script = ROOT / words[1]
    assert not Path(words[1]).is_absolute() and script.is_file(), f"{words[1]}: no such script in the repository"
    command = _cli_command(script)
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    return script, cmd.make_context(" ".join(command), words[2:]).params


def _data_on_the_mounted_volume(doc: dict, cfg) -> None:
    """Datasets are read from paths (folder layouts hand image paths to tasks on any pod): every pod of the cluster
    mounts the data volume at /data, and every data path of the job is under it."""
    spec = doc["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        assert {"mountPath": "/data", "name": "data", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        assert any(v["name"] == "data" and "persistentVolumeClaim" in v for v in pod["volumes"])
    for path in (cfg.stage1.data.path, cfg.stage2.data.path, cfg.eval.medhalt_path, cfg.eval.ood_path):
        assert path.startswith("/data/"), path


def test_rayjob_paper_runs_the_two_stage_job_on_object_storage():
    from medvqa.config import load_config

    doc = manifests()["rayjob-paper.yaml"]
    script, params = _parse_entrypoint(doc["spec"]["entrypoint"])
    assert script.relative_to(ROOT).as_posix() == "jobs/two_stage.py" and params["preset"] == "paper"
    cfg = load_config(params["preset"], params["overrides"] or [])
    assert cfg.resources.use_gpu
    assert cfg.run.output_dir.startswith("s3://")  # the run directory in the bucket
    _data_on_the_mounted_volume(doc, cfg)


def test_rayjob_sweep_runs_the_paper_sweep_as_many_at_once_as_the_gpu_group_allows():
    from medvqa.sweep import load_space, replicate_points

    doc = manifests()["rayjob-sweep.yaml"]
    script, params = _parse_entrypoint(doc["spec"]["entrypoint"])
    assert script.relative_to(ROOT).as_posix() == "tune/sweep.py" and params["preset"] == "paper"
    changes = {k: params[k] for k in ("num_samples", "max_concurrent") if params[k] is not None}
    space = load_space(params["preset"], changes, params["overrides"] or [])
    base = space.base_config()
    _data_on_the_mounted_volume(doc, base)
    gpu = _gpu_group(doc)
    gpus_per_pod = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    # The sweep cannot see how far KubeRay may scale (Ray 2.60 publishes no maximum there): the manifest says it.
    runs = len(replicate_points(space))  # a trial trains every replicate seed at once
    assert space.max_concurrent == gpu["maxReplicas"] * gpus_per_pod // (base.resources.num_workers * runs)


def test_rayjobs_set_the_same_env_as_ray_job_submit_and_ship_no_code():
    submit_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    _, _, copied = _dockerfile()
    for name in ("rayjob-paper.yaml", "rayjob-sweep.yaml"):
        spec = manifests()[name]["spec"]
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env == {"env_vars": submit_env}, name  # no working_dir / pip: the code is in the image
        script = shlex.split(spec["entrypoint"])[1]
        assert script.split("/")[0] in copied, f"{script} is not copied into the image"
