"""The Pod Security Standards' `restricted` profile (baseline included), as Kubernetes 1.33 defines it,
checked on a pod spec; plus a read-only root filesystem, which this project requires as well."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Volume types the restricted profile admits.
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way ``pod`` (a PodSpec) breaks the restricted profile or a read-only root filesystem."""
    found: list[str] = []
    pod_context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(f"{flag} is set")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']} is of a type the profile refuses: {sorted(kinds)}")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']} is not in the safe set")
    found += _context_violations("the pod", pod_context)
    for container in all_containers(pod):
        name = f"container {container['name']}"
        context = container.get("securityContext") or {}
        found += _context_violations(name, context)
        if context.get("privileged"):
            found.append(f"{name} is privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name} does not set allowPrivilegeEscalation: false")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name} sets procMount {context['procMount']}")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name} does not drop ALL capabilities")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name} adds capabilities beyond NET_BIND_SERVICE")
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            found.append(f"{name} is not runAsNonRoot (neither it nor the pod sets it)")
        if context.get("runAsNonRoot") is False:
            found.append(f"{name} sets runAsNonRoot: false")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name} has no RuntimeDefault or Localhost seccomp profile (it has {seccomp})")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{name} binds host port {port['hostPort']}")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name} does not have a read-only root filesystem")
    return found


def _context_violations(owner: str, context: dict[str, Any]) -> list[str]:
    """The checks a pod's and a container's security context share."""
    found = []
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        found.append(f"{owner} is a Windows HostProcess")
    if context.get("runAsUser") == 0:
        found.append(f"{owner} runs as user 0")
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append(f"{owner} sets an Unconfined seccomp profile")
    if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
        found.append(f"{owner} sets an Unconfined AppArmor profile")
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        found.append(f"{owner} sets SELinux options the profile refuses: {selinux}")
    return found
