"""The Kubernetes manifests in deploy/k8s/, checked without a cluster.

1. Every resource validates against the Kubernetes OpenAPI schemas that kubernetes-validate ships
   (strict: an unknown or misspelt field fails), for the oldest version we support and the newest.
2. By construction, the manifests agree with the code: the container runs the Procfile's command,
   the probes hit /ready and /health on the container's port, the ConfigMap only sets variables
   service/settings.py reads (and values it accepts), the grace period outlasts gunicorn's, the
   resources follow the worker count, the user is the Dockerfile's.
3. As root, the pod itself: the Deployment's container (its command, working directory, user,
   ConfigMap environment, read-only root with only the /tmp emptyDir writable, the Secret's file
   at its mount path) runs from this checkout in a sandbox built from the manifest, with the
   ConfigMap's REDIS_URL host resolving to a private redis-server, while this file plays the
   kubelet: startup, readiness and liveness probes, then preStop and SIGTERM mid-stream.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate.utils as kv  # the dev extra: schemas for each Kubernetes version, offline
import pytest
import yaml

from service.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parent.parent

K8S = ROOT / "deploy" / "k8s"
PROCFILE_COMMAND = "gunicorn -c service/gunicorn.conf.py 'service:create_app()'"
CORE = ["configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
# The oldest Kubernetes the manifests claim (PodDisruptionBudget.unhealthyPodEvictionPolicy is
# beta and on by default from 1.27) and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.27", "newest"]
# Variables the ConfigMap may set before service/settings.py reads them. API_KEYS_FILE (issue 10,
# being added concurrently): until it is in ENV_VARS the service ignores it, and the pod runs
# without keys; once it is there this allow-list is redundant and can go.
PENDING_ENV_VARS = {"API_KEYS_FILE"}
# Set in the Deployment's own `env`, not service settings: XDG_RUNTIME_DIR moves gunicorn's control
# socket (default $HOME/.gunicorn/, on the read-only root) to the /tmp emptyDir.
PROCESS_ENV_VARS = {"XDG_RUNTIME_DIR", "NUMBA_CACHE_DIR"}  # read by gunicorn and numba, not Settings
# Measured RSS of one gunicorn worker serving the shipped model under load (README Performance:
# 569, 585 MB with the 3 x 512 model; 537, 558 MB with the 2 x 512 one; 445, 463 MB before numba).
WORKER_RSS_MIB = 590


# ---- loading -------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def one(kind: str, name: str | None = None, path: Path | None = None) -> dict[str, Any]:
    found = [
        d
        for p in ([path] if path else manifest_files())
        for d in documents(p)
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return one("Deployment", "lstm-lm")


def pod_spec() -> dict[str, Any]:
    return deployment()["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return c


def config() -> dict[str, str]:
    return one("ConfigMap", "lstm-lm-config")["data"]


def secret_template() -> dict[str, Any]:
    return one("Secret", "lstm-lm-api-keys")


def container_port() -> int:
    (port,) = container()["ports"]
    return int(port["containerPort"])


def resolve_port(port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert port in by_name, f"port {port!r} names no container port"
    return int(by_name[port])


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity)
    assert m, f"unexpected quantity {quantity!r}"
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 1 / 2**20)


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def gunicorn_setting(name: str) -> Any:
    """A constant from service/gunicorn.conf.py, read without running it (it sets up metrics)."""
    tree = ast.parse((ROOT / "service" / "gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"gunicorn.conf.py sets no {name}")


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def mount_of(path: str) -> dict[str, Any]:
    """The volume mount that holds `path` (the deepest one)."""
    mounts = [
        m for m in container().get("volumeMounts", []) if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume(name: str) -> dict[str, Any]:
    (v,) = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return v


# ---- 1. schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_kubernetes_schemas(path: Path, version: str) -> None:
    if version == "newest":
        version = kv.latest_version()
    docs = documents(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        # strict: additionalProperties false, so a misspelt field fails instead of being ignored;
        # a kind without a schema raises SchemaNotFoundError, which fails the test too
        kv.validate(doc, version, strict=True)


def test_kustomization_lists_the_core_resources() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == CORE
    assert all((K8S / r).is_file() for r in CORE)
    # applying must never replace the real keys with the template's placeholder
    assert "secret.yaml" not in kustomization["resources"]
    (image,) = kustomization["images"]
    assert image["name"] == container()["image"].split(":")[0]


def test_kustomize_renders_valid_resources() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH: `kubectl kustomize` not checked (the schema tests still ran)")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    )
    for doc in rendered:
        kv.validate(doc, kv.latest_version(), strict=True)


# ---- 2. by construction --------------------------------------------------------------------


def test_container_runs_the_procfile_command() -> None:
    assert (ROOT / "Procfile").read_text().strip() == f"web: {PROCFILE_COMMAND}"
    c = container()
    assert c["command"] == shlex.split(PROCFILE_COMMAND)
    assert "args" not in c
    # relative paths (service/gunicorn.conf.py) resolve in the image's WORKDIR, where it copies service/
    (workdir,) = re.findall(r"^WORKDIR (\S+)", dockerfile(), re.M)
    assert c["workingDir"] == workdir
    assert PROCFILE_COMMAND in dockerfile()  # and the image's own CMD is the same command


def test_probes_hit_ready_and_health_on_the_container_port() -> None:
    c = container()
    port = container_port()
    assert int(config()["PORT"]) == port, "gunicorn binds PORT: it must be the containerPort"
    for probe, path in [("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")]:
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(get["port"]) == port, probe
        assert get.get("scheme", "HTTP") == "HTTP"
    # a pod whose Redis is away goes unready (503 on /ready) but is not restarted for it
    assert c["livenessProbe"]["httpGet"]["path"] != "/ready"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for the model load on a busy node"
    (svc_port,) = one("Service", "lstm-lm")["spec"]["ports"]
    assert resolve_port(svc_port["targetPort"]) == port


def test_configmap_sets_only_what_the_service_reads() -> None:
    data = config()
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    unknown = set(data) - set(ENV_VARS) - PENDING_ENV_VARS
    assert not unknown, f"the service does not read {sorted(unknown)} (service/settings.py ENV_VARS)"
    # and the values are ones it accepts: the same parse gunicorn.conf.py and create_app do
    settings = Settings.from_env(data)
    settings.check_store()
    assert settings.redis_url and urlsplit(settings.redis_url).hostname, "several workers need a shared Redis"
    assert str(settings.model_dir).startswith(container()["workingDir"] + "/model/")


def test_writable_paths_are_on_volumes_and_the_root_is_read_only() -> None:
    spec, c = pod_spec(), container()
    (uid,) = re.findall(r"useradd .*--uid (\d+)", dockerfile())
    assert spec["securityContext"]["runAsUser"] == int(uid)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # tempfile (gunicorn's heartbeat files, temp files), the metrics directory and gunicorn's
    # control socket need a writable place: the /tmp emptyDir
    assert "emptyDir" in volume(mount_of("/tmp")["name"])
    assert "emptyDir" in volume(mount_of(config()["PROMETHEUS_MULTIPROC_DIR"])["name"])
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    assert set(env) <= PROCESS_ENV_VARS, "service settings belong in the ConfigMap"
    assert "emptyDir" in volume(mount_of(env["XDG_RUNTIME_DIR"])["name"])
    assert "emptyDir" in volume(mount_of(env["NUMBA_CACHE_DIR"])["name"])


def test_api_keys_file_is_the_mounted_secret() -> None:
    keys_file = config()["API_KEYS_FILE"]
    mount = mount_of(keys_file)
    assert mount.get("readOnly") is True
    source = volume(mount["name"])["secret"]
    secret = secret_template()
    assert source["secretName"] == secret["metadata"]["name"]
    assert source.get("optional") is not True, "no Secret must mean no pod, not a pod without keys"
    key = keys_file[len(mount["mountPath"].rstrip("/")) + 1 :]
    assert key in {**secret.get("data", {}), **secret.get("stringData", {})}, "API_KEYS_FILE names no key of the Secret"
    assert "items" not in source  # the whole Secret as files: the key name is the file name
    # readable by the service's user: group-readable, and the pod's fsGroup owns the files
    assert source["defaultMode"] & 0o040 and pod_spec()["securityContext"]["fsGroup"] == int(
        pod_spec()["securityContext"]["runAsGroup"]
    )
    # later envFrom sources win: optional secret overrides come after the ConfigMap
    env_from = container()["envFrom"]
    assert env_from[0]["configMapRef"]["name"] == "lstm-lm-config"
    assert all(e["secretRef"].get("optional") is True for e in env_from[1:])


def test_grace_period_outlasts_prestop_and_gunicorn() -> None:
    spec, c = pod_spec(), container()
    graceful_timeout = gunicorn_setting("graceful_timeout")
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = int(command[1])
    assert pre_stop >= 5, "time for the endpoint removal to reach every node's proxy"
    # the grace period counts from the start of preStop; gunicorn's SIGTERM comes after it
    assert spec["terminationGracePeriodSeconds"] > pre_stop + graceful_timeout


def test_resources_follow_the_workers() -> None:
    settings = Settings.from_env(config())
    requests = container()["resources"]["requests"]
    limits = container()["resources"]["limits"]
    assert cores(requests["cpu"]) == settings.workers, "one requested core per gunicorn worker"
    assert "cpu" not in limits, "no CPU limit: CFS throttling stalls token streams"
    # cores per worker bound the threads: os.cpu_count() in a pod sees the node, not the request
    assert settings.torch_threads * settings.workers <= cores(requests["cpu"])
    assert settings.blas_threads * settings.workers <= cores(requests["cpu"])
    assert settings.torch_threads >= 1 and settings.blas_threads >= 1, "0 would mean node cores / workers"
    tmp = mebibytes(volume(mount_of("/tmp")["name"])["emptyDir"]["sizeLimit"])
    assert mebibytes(requests["memory"]) >= settings.workers * WORKER_RSS_MIB + tmp
    assert mebibytes(limits["memory"]) >= 1.5 * mebibytes(requests["memory"]), "headroom above the request"


def test_autoscaler_and_disruption_budget_target_the_pods() -> None:
    d = deployment()
    assert "replicas" not in d["spec"], "the HPA owns the replica count; a value here resets it on apply"
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one("HorizontalPodAutoscaler", "lstm-lm")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lstm-lm"}
    ((metric),) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container()["resources"]["requests"], "utilisation is a share of the CPU request"
    assert hpa["minReplicas"] >= 2
    pdb = one("PodDisruptionBudget", "lstm-lm")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    assert one("Service", "lstm-lm")["spec"]["selector"].items() <= labels.items()


def test_optional_redis_matches_the_default_url() -> None:
    path = K8S / "optional" / "redis.yaml"
    svc, sts = one("Service", "redis", path), one("StatefulSet", "redis", path)
    url = urlsplit(config()["REDIS_URL"])
    assert url.hostname == svc["metadata"]["name"] and url.port == svc["spec"]["ports"][0]["port"]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "redis"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["command"]
    flag = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert flag["--maxmemory-policy"] == "volatile-lru"  # sessions carry TTLs: least recently used go first
    assert mebibytes(c["resources"]["limits"]["memory"]) > 1.5 * mebibytes(flag["--maxmemory"].replace("mb", "Mi"))
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (mount,) = c["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"] and mount["mountPath"] == flag["--dir"]
    assert flag["--appendonly"] == "yes"
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]


# ---- 3. the pod, run for real --------------------------------------------------------------
#
# The sandbox is a private mount, network and PID namespace (`unshare`): a read-only tmpfs root
# holding read-only binds of /usr, this interpreter and its venv, the checkout at the image's
# WORKDIR, a copy of /etc whose hosts file resolves the ConfigMap's Redis host to loopback, the
# Secret's file at its mount path, and a tmpfs for each emptyDir. The container process is
# started as the manifest says (chroot, setpriv to its uid/gid/fsGroup with no capabilities,
# `env -i` with the ConfigMap, its workingDir, its command). When the sandbox's first process
# exits, the kernel ends everything in it.


def pod_sandbox_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount and network namespaces)"
    for tool in ("unshare", "chroot", "setpriv", "ip", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH"
    if ROOT.resolve().is_relative_to("/tmp"):
        return f"the checkout ({ROOT}) is under /tmp, which the pod's emptyDir mounts over; clone it elsewhere"
    probe = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"namespaces unavailable here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def test_pod_runs_as_the_manifest_says(tmp_path: Path) -> None:
    missing = pod_sandbox_missing()
    if missing:
        pytest.skip(f"pod sandbox: {missing}")
    key = os.urandom(16).hex()
    run = subprocess.run(
        [
            "unshare",
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--propagation",
            "private",
            sys.executable,
            __file__,
            "pod",
            str(tmp_path),
            key,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, f"sandbox failed:\n{run.stderr[-5000:]}"
    r = json.loads(run.stdout.strip().splitlines()[-1])
    log = r.get("log", "")
    assert r.get("error") is None, f"{r.get('error')}\ncontainer log:\n{log}"
    # startup, readiness, liveness as the kubelet sees them
    assert r["startup_probe_ok"], log
    assert r["ready"]["status"] == "ready" and r["ready"]["checks"]["store"].startswith("ok (redis"), r["ready"]
    assert r["live"] == {"status": "ok"}
    # the ConfigMap's REDIS_URL host resolved, sessions work through it
    assert r["session_status"] == 201 and r["generate_status"] == 200
    if "API_KEYS_FILE" in ENV_VARS:  # the service reads it (issue 10): the Secret's key is required
        assert r["unauthenticated_status"] == 401
    assert r["worker_count"] == int(config()["WEB_CONCURRENCY"])
    # the root refuses writes; what needs writing went to the /tmp emptyDir
    assert Path(config()["PROMETHEUS_MULTIPROC_DIR"]).name in r["tmp_entries"]
    assert r["root_write"] == "read-only", r["root_write"]
    # idle memory of the pod's processes fits its memory request
    request = mebibytes(container()["resources"]["requests"]["memory"])
    assert r["rss_mib"] < request, f"pod RSS {r['rss_mib']:.0f} MiB over the {request:.0f} MiB request"
    # shutdown: preStop, then SIGTERM mid-stream; the stream still ends properly, within the grace
    assert r["pre_stop_rc"] == 0
    assert r["stream_tokens"] > r["stream_tokens_before_sigterm"], "no token arrived after SIGTERM"
    final = r["stream_final"]
    assert final is not None and final.get("finish_reason"), r
    assert final["usage"]["completion_tokens"] == r["stream_tokens"]
    assert r["exit_code"] == 0, log
    # nothing in the pod failed quietly (e.g. a write to the read-only root caught and logged)
    problems = [line for line in log.splitlines() if "[ERROR]" in line or " ERROR " in line or "Traceback" in line]
    assert not problems, log
    assert r["shutdown_seconds"] < pod_spec()["terminationGracePeriodSeconds"]


def _sandbox(cmd: list[str | Path]) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def _bind(src: str | Path, dst: Path, *, writable: bool = False) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    _sandbox(["mount", "--rbind", src, dst])
    if not writable:
        _sandbox(["mount", "-o", "remount,bind,ro", dst])


def _build_root(root: Path, scratch: Path, key: str) -> None:
    """The container's filesystem, as the manifest and the image describe it."""
    spec, c, data = pod_spec(), container(), config()
    root.mkdir()
    _sandbox(["mount", "-t", "tmpfs", "-o", "mode=755", "pod-root", root])
    for name in ("bin", "lib", "lib64", "sbin"):  # merged /usr
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), root / name)
    _bind("/usr", root / "usr")
    _bind("/dev", root / "dev", writable=True)
    _bind("/proc", root / "proc", writable=True)
    _bind("/sys", root / "sys")
    for prefix in {sys.base_prefix, sys.prefix}:  # this interpreter and its venv (the image's /usr/local)
        if not prefix.startswith("/usr/"):
            _bind(prefix, root / prefix.lstrip("/"))
    _bind(ROOT, root / c["workingDir"].lstrip("/"))  # the image's COPY of the checkout
    (root / "home" / "app").mkdir(parents=True)
    # /etc: a copy, with the image's user and the cluster DNS name of Redis
    shutil.copytree("/etc", root / "etc", symlinks=True)
    uid, gid = spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]
    with open(root / "etc" / "passwd", "a") as f:
        f.write(f"app:x:{uid}:{gid}::/home/app:/bin/sh\n")
    with open(root / "etc" / "group", "a") as f:
        f.write(f"app:x:{gid}:\n")
    redis_host = urlsplit(data["REDIS_URL"]).hostname
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost {redis_host}\n::1 localhost\n")
    # volumes
    for m in c["volumeMounts"]:
        v = volume(m["name"])
        target = root / m["mountPath"].lstrip("/")
        if "emptyDir" in v:
            size = v["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m").replace("Gi", "g")
            target.mkdir(parents=True, exist_ok=True)
            _sandbox(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", m["name"], target])
        elif "secret" in v:
            files = scratch / "secret"
            files.mkdir()
            secret_key = config()["API_KEYS_FILE"].rsplit("/", 1)[1]
            (files / secret_key).write_text(key + "\n")
            os.chown(files / secret_key, 0, spec["securityContext"]["fsGroup"])
            os.chmod(files / secret_key, v["secret"]["defaultMode"])
            _bind(files, target)
        else:
            raise AssertionError(f"the sandbox does not know volume {v}")
    _sandbox(["mount", "-o", "remount,ro", root])


def _exec_in_container(root: Path, command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """A process in the container: its root, user, groups, capabilities, environment, directory."""
    spec, c = pod_spec(), container()
    sc = spec["securityContext"]
    env = {
        # the image's ENV, its PATH (here: the venv's bin for /usr/local/bin), the user's HOME
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/home/app",
        "HOSTNAME": "lstm-lm-pod",
        **config(),  # envFrom (the optional Secret lstm-lm-env does not exist here)
        **{e["name"]: e["value"] for e in c.get("env", [])},  # env wins over envFrom
    }
    return subprocess.Popen(
        [
            "chroot",
            str(root),
            "setpriv",
            f"--reuid={sc['runAsUser']}",
            f"--regid={sc['runAsGroup']}",
            f"--groups={sc['fsGroup']}",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "env",
            "-i",
            "-C",
            c["workingDir"],
            *[f"{k}={v}" for k, v in env.items()],
            *command,
        ],
        **popen,
    )


def _http(method: str, url: str, body: dict[str, Any] | None, key: str | None, timeout: float) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _probe(base: str, probe: dict[str, Any]) -> bool:
    """One kubelet httpGet probe: success is a 2xx/3xx within timeoutSeconds."""
    try:
        with urllib.request.urlopen(base + probe["httpGet"]["path"], timeout=probe.get("timeoutSeconds", 1)) as r:
            return 200 <= r.status < 400
    except (OSError, urllib.error.HTTPError):
        return False


def _rss_mib(pid: int) -> tuple[float, int]:
    """RSS of a process and its children (the gunicorn master and its workers), and the child count."""
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in [pid, *children]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024, len(children)


def _pod_main(scratch: Path, key: str) -> dict[str, Any]:
    """Inside the namespaces: build the root, start Redis and the container, play the kubelet."""
    result: dict[str, Any] = {"error": None}
    c, data = container(), config()
    root = scratch / "root"
    _build_root(root, scratch, key)
    _sandbox(["ip", "link", "set", "lo", "up"])
    redis_port = urlsplit(data["REDIS_URL"]).port or 6379
    redis_dir = scratch / "redis"
    redis_dir.mkdir()
    subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(redis_dir)],
        stdout=subprocess.DEVNULL,
    )
    log_path = scratch / "container.log"
    with open(log_path, "wb") as log:
        proc = _exec_in_container(root, c["command"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{container_port()}"
    try:
        startup = c["startupProbe"]
        result["startup_probe_ok"] = False
        for _ in range(startup["failureThreshold"]):
            started = time.monotonic()
            if _probe(base, startup):
                result["startup_probe_ok"] = True
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the container exited with {proc.returncode} during startup")
            time.sleep(max(0.0, startup["periodSeconds"] - (time.monotonic() - started)))
        if not result["startup_probe_ok"]:
            raise RuntimeError("the startup probe never succeeded")
        # readiness may take one more period (Redis); the kubelet keeps probing
        for _ in range(c["readinessProbe"].get("failureThreshold", 3) + 5):
            if _probe(base, c["readinessProbe"]):
                break
            time.sleep(c["readinessProbe"]["periodSeconds"])
        result["ready"] = _http("GET", base + "/ready", None, key, 5)[1]
        result["live"] = _http("GET", base + "/health", None, key, 5)[1]
        result["unauthenticated_status"] = _http("POST", base + "/sessions", {"text": "ROMEO:\n"}, None, 30)[0]
        status, created = _http("POST", base + "/sessions", {"text": "ROMEO:\n"}, key, 30)
        result["session_status"] = status
        session = created.get("session_id") if isinstance(created, dict) else None
        status, _ = _http("POST", base + "/generate", {"session_id": session, "max_tokens": 16, "seed": 1}, key, 60)
        result["generate_status"] = status
        result["rss_mib"], result["worker_count"] = _rss_mib(proc.pid)
        result["tmp_entries"] = sorted(os.listdir(root / "tmp"))
        writer = _exec_in_container(root, ["touch", "/app/written-by-the-pod"], stderr=subprocess.PIPE)
        _, err = writer.communicate(timeout=30)
        result["root_write"] = "read-only" if b"Read-only file system" in err else f"rc={writer.returncode} {err!r}"

        # termination as the kubelet does it: preStop, then SIGTERM to the container's process,
        # all within terminationGracePeriodSeconds. A stream is in flight when SIGTERM lands.
        t0 = time.monotonic()
        pre_stop = _exec_in_container(root, c["lifecycle"]["preStop"]["exec"]["command"])
        result["pre_stop_rc"] = pre_stop.wait(timeout=pod_spec()["terminationGracePeriodSeconds"])
        max_tokens = Settings.from_env(data).max_tokens_limit
        request = urllib.request.Request(
            base + "/generate",
            data=json.dumps({"prompt": "KING:", "max_tokens": max_tokens, "stream": True, "seed": 3}).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        tokens, final = 0, None
        with urllib.request.urlopen(request, timeout=60) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "token" in event:
                    tokens += 1
                    if tokens == 1:
                        proc.send_signal(signal.SIGTERM)
                        result["stream_tokens_before_sigterm"] = tokens
                else:
                    final = event
        result["stream_tokens"], result["stream_final"] = tokens, final
        grace = pod_spec()["terminationGracePeriodSeconds"]
        try:
            result["exit_code"] = proc.wait(timeout=max(0.0, grace - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            result["exit_code"] = "SIGKILL: outlived terminationGracePeriodSeconds"
        result["shutdown_seconds"] = time.monotonic() - t0
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if proc.poll() is None:
            proc.kill()
        result["log"] = log_path.read_text(errors="replace")[-50_000:]
    return result


if __name__ == "__main__":
    # python tests/test_k8s.py pod SCRATCH_DIR KEY: run by test_pod_runs_as_the_manifest_says
    # inside `unshare`; everything it starts ends with it (it is PID 1 of its namespace)
    if len(sys.argv) != 4 or sys.argv[1] != "pod":
        sys.exit("usage: test_k8s.py pod SCRATCH_DIR KEY (run by pytest, inside unshare)")
    print(json.dumps(_pod_main(Path(sys.argv[2]), sys.argv[3])))
