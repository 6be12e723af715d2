"""deploy/kuberay/ manifests validate against KubeRay's own CRD schemas (vendored), strictly as
``kubectl --validate=strict`` does, and agree with the code they deploy."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft4Validator

from factory.cli import build_parser
from factory.cohort.spec import load_spec
from factory.raycluster import parse_workers
from serve.config import parse_serve_config, read_app_args
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kuberay"
CRDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MANIFESTS = {
    "RayCluster": "raycluster.yaml",
    "RayJob": "rayjob.yaml",
    "RayService": "rayservice.yaml",
}
SPEC_MOUNT = "/etc/ct-factory/specs"


def strict(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as a JSON schema that refuses unknown fields where
    Kubernetes does (no ``x-kubernetes-preserve-unknown-fields``), with its int-or-string and
    nullable extensions spelled out."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, Draft4Validator]:
    """One validator per kind, for the CRD version a manifest's apiVersion names (ray.io/v1)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each
    out = {}
    for kind, name in CRDS.items():
        crd = yaml.load((DEPLOY / "crds" / name).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = Draft4Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return out


def manifest(kind: str) -> dict:
    return yaml.safe_load((DEPLOY / MANIFESTS[kind]).read_text())


def problems(validators, document: dict) -> list[str]:
    """Every schema violation of a manifest, as ``path.to.field: message``."""
    assert document["apiVersion"] == "ray.io/v1"
    return sorted(
        ".".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validators[document["kind"]].iter_errors(document)
    )


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_validates_against_kuberay_crd(validators, kind):
    document = manifest(kind)
    assert document["kind"] == kind and document["metadata"]["name"]
    assert problems(validators, document) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=8),
            "spec.workerGroupSpecs.0: Additional properties are not allowed ('maxReplica' was "
            "unexpected)",
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
            "spec.workerGroupSpecs.0.replicas: 'two' is not of type 'integer'",
        ),
        (
            lambda d: d["spec"]["headGroupSpec"].pop("template"),
            "spec.headGroupSpec: 'template' is a required property",
        ),
        (
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolice="Always"
            ),
            "spec.headGroupSpec.template.spec.containers.0: Additional properties are not "
            "allowed ('imagePullPolice' was unexpected)",
        ),
    ],
    ids=["unknown field", "wrong type", "missing required", "unknown pod field"],
)
def test_a_broken_manifest_is_refused_naming_the_field(validators, edit, problem):
    document = copy.deepcopy(manifest("RayCluster"))
    edit(document)
    assert problems(validators, document) == [problem]


def test_rayservice_runs_the_shipped_cluster_and_serve_config():
    cluster, service = manifest("RayCluster"), manifest("RayService")
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    # The same Serve config, but replicas ask for a GPU: with GPU nodes scaled to zero at
    # deploy time, "auto" would see no GPU and place CPU replicas.
    expected = copy.deepcopy(shipped)
    expected["applications"][0]["args"]["gpus_per_replica"] = 1
    assert served == expected
    args = served["applications"][0]["args"]
    assert parse_serve_config(args).gpus_per_replica == 1
    assert (
        read_app_args(ROOT / "serve" / "config.yaml")[1]["import_path"]
        == (served["applications"][0]["import_path"])
    )


def test_rayjob_generates_a_shipped_spec_on_the_shipped_cluster():
    cluster, job = manifest("RayCluster"), manifest("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts[SPEC_MOUNT]]["configMap"]["name"] == "ct-factory-specs"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["ctfactory", "generate"]
    args = build_parser().parse_args(argv[1:])  # every flag is one generate has
    assert args.out.startswith("s3://") and parse_workers(args.workers)[0] >= 1
    # The spec is a file of cohorts/, which `kubectl create configmap --from-file=cohorts/` mounts.
    spec = Path(args.spec)
    assert spec.parent == Path(SPEC_MOUNT)
    assert load_spec(ROOT / "cohorts" / spec.name).cohort.n >= 1
