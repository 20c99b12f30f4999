"""deploy/docker, compose and k8s: parsed and cross-checked without Docker or a cluster.

Neither Docker nor Kubernetes runs in CI here, so these tests check what can be checked
statically: files parse, every path a Dockerfile copies exists, ports and names agree
between the server's arguments, compose, Prometheus, Grafana and the manifests, and the
server images install no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testing.prometheus_harness import DEPLOY, ROOT

DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
GRPC_PORT, METRICS_PORT = 50051, 9464


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def json_list(args: str) -> list[str]:
    return yaml.safe_load(args)


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


K8S_MILVUS = DEPLOY / "k8s-milvus"


def k8s_docs(folder: Path = K8S) -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


SERVER_IMAGES = [DOCKER / "server.Dockerfile", DOCKER / "server-gpu.Dockerfile"]
ALL_IMAGES = [*SERVER_IMAGES, DOCKER / "train.Dockerfile"]


@pytest.mark.parametrize("dockerfile", ALL_IMAGES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths_and_runs_a_project_module(dockerfile: Path):
    steps = instructions(dockerfile)
    assert steps[0][0] == "FROM"
    for kind, args in steps:
        if kind == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} is missing"
    entry = json_list(next(a for k, a in steps if k == "ENTRYPOINT"))
    assert entry[:2] == ["python", "-m"]
    package = ROOT / entry[2]
    assert (package / "__init__.py").exists(), f"{entry[2]} is not a package of the project"
    copied = {a.split()[0] for k, a in steps if k == "COPY"}
    assert entry[2] in copied, f"the image runs {entry[2]} but does not copy it"
    assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").exists()


@pytest.mark.parametrize("dockerfile", SERVER_IMAGES, ids=lambda p: p.name)
def test_server_images_install_no_torch_and_expose_the_ports(dockerfile: Path):
    steps = instructions(dockerfile)
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "[train]" not in runs and "pip install torch" not in runs
    assert "find_spec('torch') is not None" in runs  # the build fails if torch sneaks in
    assert "COPY train" not in dockerfile.read_text()
    exposed = {int(p) for k, a in steps if k == "EXPOSE" for p in a.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}
    cmd = json_list(next(a for k, a in steps if k == "CMD"))
    assert flag_value(cmd, "--port") == str(GRPC_PORT)
    assert flag_value(cmd, "--metrics-port") == str(METRICS_PORT)
    assert flag_value(cmd, "--host") == "0.0.0.0"


def test_compose_wires_server_prometheus_and_grafana():
    services = compose()["services"]
    assert set(services) >= {"server", "prometheus", "grafana"}
    server = services["server"]
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == (
        DOCKER / "server.Dockerfile"
    ).resolve()
    metrics_port = flag_value(server["command"], "--metrics-port")
    grpc_port = flag_value(server["command"], "--port")
    assert f"{grpc_port}:{grpc_port}" in server["ports"]
    assert "/data" in [v.split(":")[1] for v in server["volumes"]]
    assert str(grpc_port) in " ".join(server["healthcheck"]["test"])

    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus_config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"server:{metrics_port}"]
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).exists(), volume
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/var/lib/grafana/dashboards/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()


def test_k8s_manifests_reference_each_other():
    docs = k8s_docs()
    kinds = {kind for kind, _ in docs}
    assert kinds >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }
    deployment = docs[("Deployment", "tcm-server")]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    config = docs[("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])]
    used = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert used == set(config["data"]), "every ConfigMap key is used by the args, and only those"
    assert ("PersistentVolumeClaim", volumes["data"]["persistentVolumeClaim"]["claimName"]) in docs
    assert ("Secret", volumes["keys"]["secret"]["secretName"]) in docs
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == flag_value(container["args"], "--data-dir")
    assert flag_value(container["args"], "--api-keys").startswith(mounts["keys"] + "/")
    key_file = Path(flag_value(container["args"], "--api-keys")).name
    assert key_file in docs[("Secret", volumes["keys"]["secret"]["secretName"])]["stringData"]
    assert "--no-auth" not in container["args"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert int(flag_value(container["args"], "--port")) == ports["grpc"]
    assert int(flag_value(container["args"], "--metrics-port")) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one WAL writer

    service = docs[("Service", "tcm-server")]
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]

    hpa = docs[("HorizontalPodAutoscaler", "tcm-server")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    monitor = docs[("ServiceMonitor", "tcm-server")]
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def server_flags_used() -> set[str]:
    argvs = [compose()["services"]["server"]["command"]]
    argvs += [json_list(next(a for k, a in instructions(p) if k == "CMD")) for p in SERVER_IMAGES]
    for folder in (K8S, K8S_MILVUS):
        argvs.append(
            k8s_docs(folder)[("Deployment", "tcm-server")]["spec"]["template"]["spec"][
                "containers"
            ][0]["args"]
        )
    return {a for argv in argvs for a in argv if a.startswith("--")}


def test_server_accepts_every_flag_deploy_passes():
    help_text = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    missing = {f for f in server_flags_used() if f not in help_text}
    assert not missing, f"python -m server --help does not list {sorted(missing)}"


def test_deploy_readme_says_what_is_only_validated_statically():
    text = (DEPLOY / "README.md").read_text()
    assert "statically" in text and "promtool" in text


PROJECT_PACKAGES = (
    "contracts",
    "imagesets",
    "embedding",
    "scorenorm",
    "calibrate",
    "server",
    "retrieval",
)


@pytest.mark.slow
def test_server_image_contents_install_and_run_without_torch(tmp_path: Path):
    """What server.Dockerfile does, minus Docker: only its COPY sources, `pip install .`
    (as a wheel into a target folder), then `python -m server --help` from outside the
    repository. Every project module must come from the install and torch must stay out."""
    steps = instructions(DOCKER / "server.Dockerfile")
    src = tmp_path / "src"
    src.mkdir()
    for kind, args in steps:
        if kind == "COPY":
            *sources, _ = args.split()
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                    shutil.copytree(path, src / source, ignore=ignore)
                else:
                    shutil.copy(path, src / source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), "."]
    subprocess.run(wheel, cwd=src, check=True, capture_output=True, timeout=300)
    (whl,) = (tmp_path / "w").glob("*.whl")
    target = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--target", str(target), str(whl)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['server', '--help']\n"
        "try:\n    runpy.run_module('server', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "import server.cli, server.monitoring, embedding.defaults as d\n"
        "assert d.DEFAULT_MODEL.exists(), d.DEFAULT_MODEL\n"
        f"tops = {(*PROJECT_PACKAGES, 'train', 'demo')!r}\n"
        "bad = sorted(n for n, m in list(sys.modules.items()) if n.split('.')[0] in tops\n"
        f"    and getattr(m, '__file__', None) and not m.__file__.startswith({str(target)!r}))\n"
        "print('outside:', bad)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--metrics-port" in result.stdout
    assert "outside: []" in result.stdout, result.stdout[-2000:]
    assert "torch loaded: False" in result.stdout


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_k8s_manifests_match_the_kubernetes_schema(version: str):
    """Strict OpenAPI-schema validation (unknown fields are errors), offline.

    ServiceMonitor is a Prometheus Operator CRD without a bundled schema; the reference
    checks above cover it.
    """
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for folder in (K8S, K8S_MILVUS):
        for (kind, _), doc in k8s_docs(folder).items():
            if kind == "ServiceMonitor":
                continue
            kv.validate(doc, version, strict=True)  # raises ValidationError naming the field
            checked += 1
    assert checked == 6 + 6


def test_milvus_replicas_are_stateless_and_wired_to_the_store():
    """deploy/k8s-milvus: no volume claim, rolling updates, more than one replica, every
    ConfigMap key used, the gallery pointed at the Milvus release of deploy/milvus."""
    docs = k8s_docs(K8S_MILVUS)
    deployment = docs[("Deployment", "tcm-server")]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["spec"]["replicas"] > 1
    assert not any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"])
    assert ("PersistentVolumeClaim", "tcm-server-data") not in docs
    config = docs[("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])]
    used = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert used == set(config["data"])
    assert flag_value(container["args"], "--gallery") == "$(TCM_GALLERY)"
    assert config["data"]["TCM_GALLERY"].startswith("milvus://tcm-milvus.milvus.svc:")
    values = yaml.safe_load((DEPLOY / "milvus" / "values.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    assert "helm install tcm-milvus" in (DEPLOY / "milvus" / "values.yaml").read_text()
    hpa = docs[("HorizontalPodAutoscaler", "tcm-server")]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    kustomization = yaml.safe_load((K8S_MILVUS / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S_MILVUS / resource).is_file(), resource
