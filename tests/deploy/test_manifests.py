"""deploy/: every kustomization renders with `kubectl kustomize`, its core kinds validate strictly against
the Kubernetes 1.33 schemas (kubernetes-validate ships them), and the pods meet the restricted Pod
Security Standard and the sidecar's own needs (probes, drain, threads, a writable cache).

Nothing here runs on a cluster: these are offline checks of the rendered manifests.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from tests.deploy.pod_security import restricted_violations

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.33"
KUBECTL = shutil.which("kubectl")
kubectl_installed = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed here, so the kustomizations cannot be rendered"
)
# Custom resources, whose schemas come with their operators, not with Kubernetes.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("cert-manager.io/v1", "Certificate"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}
HEALTH_SERVICE = "rerank.v1.Reranker"


def kustomizations() -> list[Path]:
    """Every directory whose kustomization.yaml is a Kustomization (components render through them)."""
    found = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


KUSTOMIZATIONS = kustomizations()
IDS = [str(directory.relative_to(DEPLOY)) for directory in KUSTOMIZATIONS]


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert rendered.returncode == 0, f"kubectl kustomize {directory} failed:\n{rendered.stderr}"
    return tuple(document for document in yaml.safe_load_all(rendered.stdout) if document)


def of_kind(resources: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [resource for resource in resources if resource["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env") or []}


def probes_health_service(probe: dict[str, Any]) -> bool:
    """A probe that asks grpc.health.v1 about the Reranker service: kubelet's gRPC probe, or the
    health check command (which speaks TLS and sends the token)."""
    if "grpc" in probe:
        return probe["grpc"].get("service") == HEALTH_SERVICE
    command = (probe.get("exec") or {}).get("command") or []
    return command[:1] == ["rerank-sidecar-healthcheck"] and HEALTH_SERVICE in command


def test_every_kustomization_is_found():
    expected = {"base", "kserve"} | {f"overlays/{name}" for name in ("cpu", "gpu", "monitoring", "tls")}
    expected |= {"overlays/autoscaling-hpa", "overlays/autoscaling-keda", "overlays/production-gpu"}
    assert expected <= set(IDS)


@kubectl_installed
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_renders_and_core_kinds_validate_strictly_against_kubernetes_1_33(directory: Path):
    resources = render(directory)
    assert resources, f"{directory} rendered nothing"
    for resource in resources:
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            version = kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError:
            assert (resource["apiVersion"], resource["kind"]) in CUSTOM_KINDS, (
                f"{name}: no Kubernetes {KUBERNETES_VERSION} schema for {resource['apiVersion']}, and not a "
                "custom resource this kit uses (a misspelt apiVersion or kind?)"
            )
        except ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{directory.name}: {name} does not validate at {path}: {error.message}")
        else:
            assert version == KUBERNETES_VERSION


def test_strict_validation_refuses_an_unknown_field():
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)


def pod_specs(resources: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """The pod specs a rendering creates: Deployments' templates, and ServingRuntimes' pod fields."""
    pods = [
        (f"Deployment/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in of_kind(resources, "Deployment")
    ]
    pods += [
        (f"ServingRuntime/{r['metadata']['name']}", r["spec"]) for r in of_kind(resources, "ServingRuntime")
    ]
    return pods


@kubectl_installed
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_pods_meet_the_restricted_pod_security_standard(directory: Path):
    pods = pod_specs(render(directory))
    assert pods
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


@pytest.mark.parametrize(
    ("break_it", "complaint"),
    [
        (lambda pod, c: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda pod, c: c["securityContext"]["capabilities"].update(drop=[]), "drop ALL"),
        (lambda pod, c: c["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "beyond NET_BIND"),
        (
            lambda pod, c: (
                pod["securityContext"].pop("runAsNonRoot"),
                c["securityContext"].pop("runAsNonRoot"),
            ),
            "runAsNonRoot",
        ),
        (lambda pod, c: pod["securityContext"].update(runAsUser=0), "user 0"),
        (
            lambda pod, c: (
                pod["securityContext"].pop("seccompProfile"),
                c["securityContext"].pop("seccompProfile"),
            ),
            "seccomp",
        ),
        (lambda pod, c: c["securityContext"].update(readOnlyRootFilesystem=False), "read-only root"),
        (lambda pod, c: c["securityContext"].update(privileged=True), "privileged"),
        (lambda pod, c: pod.update(hostNetwork=True), "hostNetwork"),
        (
            lambda pod, c: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
            "type the profile refuses",
        ),
        (lambda pod, c: c["ports"][0].update(hostPort=50051), "host port"),
    ],
)
def test_the_pod_security_check_catches_each_breach(break_it, complaint: str):
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    break_it(pod, pod["containers"][0])
    assert any(complaint in violation for violation in restricted_violations(pod))


def deployments_of(directory: Path) -> list[dict[str, Any]]:
    return of_kind(render(directory), "Deployment")


DEPLOYMENT_KUSTOMIZATIONS = [d for d, i in zip(KUSTOMIZATIONS, IDS, strict=True) if i != "kserve"]
DEPLOYMENT_IDS = [i for i in IDS if i != "kserve"]


@kubectl_installed
@pytest.mark.parametrize("directory", DEPLOYMENT_KUSTOMIZATIONS, ids=DEPLOYMENT_IDS)
def test_probes_drain_and_resources_fit_the_sidecar(directory: Path):
    (deployment,) = deployments_of(directory)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probes_health_service(container[kind]), f"{kind} does not check {HEALTH_SERVICE}"
    # kubelet's gRPC probes speak plaintext: a server with TLS is probed by the health check command.
    if env.get("RERANK_TLS_CERT_FILE"):
        assert all("exec" in container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe"))
    # The drain: SIGTERM comes after preStop, and the pod is killed at terminationGracePeriodSeconds.
    grace = float(env["RERANK_GRACE_PERIOD"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, "a drain would trip liveness"
    startup = container["startupProbe"]
    # The measured cold start (README, "Deploying on Kubernetes") with room for a slower node.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == env["RERANK_THREADS"]
    if env.get("RERANK_DEVICE") == "cuda":
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60  # TensorRT builds
    assert pod["automountServiceAccountToken"] is False


@kubectl_installed
@pytest.mark.parametrize("directory", DEPLOYMENT_KUSTOMIZATIONS, ids=DEPLOYMENT_IDS)
def test_the_cache_and_tmp_are_writable_volumes_and_secrets_are_mounted(directory: Path):
    (deployment,) = deployments_of(directory)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for path in (env["RERANK_CACHE_DIR"], "/tmp"):
        assert path in mounts, f"{path} is not on a volume, and the root filesystem is read-only"
        assert not mounts[path].get("readOnly"), f"{path} must be writable"
        assert (
            "emptyDir" in volumes[mounts[path]["name"]]
            or "persistentVolumeClaim" in volumes[mounts[path]["name"]]
        )
    for variable in ("RERANK_TLS_CERT_FILE", "RERANK_TLS_KEY_FILE", "RERANK_TLS_CLIENT_CA_FILE"):
        if variable in env:
            directory_path = str(Path(env[variable]).parent)
            assert directory_path in mounts, f"{variable} names a file on no volume"
            assert "secret" in volumes[mounts[directory_path]["name"]]


@kubectl_installed
@pytest.mark.parametrize("directory", DEPLOYMENT_KUSTOMIZATIONS, ids=DEPLOYMENT_IDS)
def test_services_policy_and_budget_select_the_pods_and_name_their_ports(directory: Path):
    resources = render(directory)
    (deployment,) = of_kind(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(key) == value for key, value in selector.items())

    services = {service["metadata"]["name"]: service for service in of_kind(resources, "Service")}
    assert services["rerank-sidecar"]["spec"]["clusterIP"] == "None"  # headless, for gRPC balancing
    assert services["rerank-sidecar-http"]["spec"]["type"] == "ClusterIP"
    # A mesh or gateway reads appProtocol: a TLS port announced as h2c or http gets cleartext.
    serves_tls = any(variable["name"] == "RERANK_TLS_CERT_FILE" for variable in container.get("env", []))
    for service in services.values():
        assert selects(service["spec"]["selector"])
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
        announced = {port["appProtocol"] for port in service["spec"]["ports"] if "appProtocol" in port}
        assert announced
        assert (announced == {"https"}) == serves_tls
    (policy,) = of_kind(resources, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == port_names
    (budget,) = of_kind(resources, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"])
    (account,) = of_kind(resources, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    for monitor in of_kind(resources, "ServiceMonitor"):
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} == {"metrics"}
        assert (
            services["rerank-sidecar"]["metadata"]["labels"].items()
            >= monitor["spec"]["selector"]["matchLabels"].items()
        )


@kubectl_installed
@pytest.mark.parametrize("directory", DEPLOYMENT_KUSTOMIZATIONS, ids=DEPLOYMENT_IDS)
def test_an_autoscaler_targets_the_deployment_and_owns_its_replica_count(directory: Path):
    resources = render(directory)
    (deployment,) = of_kind(resources, "Deployment")
    autoscalers = of_kind(resources, "HorizontalPodAutoscaler") + of_kind(resources, "ScaledObject")
    if not autoscalers:
        assert deployment["spec"]["replicas"] >= 2  # the PodDisruptionBudget leaves one serving
        return
    (autoscaler,) = autoscalers
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "an apply would reset the autoscaler's replica count"
    assert of_kind(resources, "ServiceMonitor"), "the autoscaler's metric needs Prometheus to scrape the pods"
    for trigger in autoscaler["spec"].get("triggers", []):
        (namespace,) = re.findall(r'namespace="([^"]+)"', trigger["metadata"]["query"])
        assert namespace == deployment["metadata"]["namespace"], "the query reads another namespace"


def test_the_adapter_rule_serves_the_metric_the_hpa_reads():
    adapter = yaml.safe_load(
        (DEPLOY / "components/autoscaling-hpa/prometheus-adapter-values.yaml").read_text()
    )
    hpa = yaml.safe_load((DEPLOY / "components/autoscaling-hpa/horizontalpodautoscaler.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in served
    keda = yaml.safe_load((DEPLOY / "components/autoscaling-keda/scaledobject.yaml").read_text())
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == metric["pods"]["target"]["averageValue"], "one target for both"
