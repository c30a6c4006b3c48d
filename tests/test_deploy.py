"""The deployment files, checked offline: the Dockerfile's instructions and stages, the compose file's services
and the Kubernetes manifests (labels and selectors, ports, probes, resources, images). Where `kubectl` is
installed, `kubectl kustomize` builds the manifests as `kubectl apply -k` would."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
IMAGE = "vlmserve"
DOCKERFILE_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                           "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0], text.split(None, 1)[1] if " " in text else "") for text in logical]


def test_the_dockerfile_parses_its_stages_are_the_ones_deployed_and_its_copies_exist():
    instructions = dockerfile_instructions()
    assert all(word in DOCKERFILE_INSTRUCTIONS for word, _ in instructions), instructions
    assert instructions[0][0] in ("FROM", "ARG")
    stages = [args.split()[-1] for word, args in instructions if word == "FROM" and " AS " in args]
    assert stages == ["builder", "server"]
    for word, args in instructions:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            assert all((ROOT / source).exists() for source in sources), args
        if word == "COPY" and args.startswith("--from"):
            assert args.split()[0].removeprefix("--from=") in stages
        if word == "RUN":
            for script in re.findall(r"scripts/[\w.-]+", args):
                assert (ROOT / script).is_file(), script
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "build" in ignored, "the build context leaves out local environments"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_project_images_with_a_vit_service_that_scales():
    services = compose()["services"]
    assert set(services) == {"build", "vit", "triton", "proxy"}
    for name, service in services.items():
        assert service["image"].split(":")[0] == IMAGE, name
        assert service["build"]["target"] in ("builder", "server")
        assert "pip install" not in str(service.get("command", "")), f"{name} installs at every start"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition["condition"].startswith("service_")
    vit = services["vit"]
    assert vit["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1, "one GPU per ViT server"
    assert "/v2/health/ready" in " ".join(vit["healthcheck"]["test"])
    assert re.fullmatch(r"\d+-\d+:8001", vit["ports"][0]), "a range of host ports: --scale vit=N"
    build = services["build"]["command"]
    assert "--role vit-server" in build and "--out build/gpu/vit_server" in build
    assert "--vit-endpoints '${VIT_ENDPOINTS-vit:8001}'" in build
    assert "build/gpu/vit_server" in vit["command"] and "build/gpu/llm_host" in services["triton"]["command"]


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())]


def test_kubernetes_manifests_are_consistent():
    documents = manifests()
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in documents}
    assert kinds <= {("v1", "Service"), ("apps/v1", "Deployment"), ("autoscaling/v2", "HorizontalPodAutoscaler")}
    deployments = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Deployment"}
    assert set(deployments) == {"vit", "llm"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
        volumes = {volume["name"] for volume in pod["spec"]["volumes"]}
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            assert container["image"].split(":")[0] == IMAGE and container["image"].split(":")[1] in ("server",
                                                                                                   "builder")
            assert {mount["name"] for mount in container.get("volumeMounts", [])} <= volumes, container["name"]
        triton = next(c for c in pod["spec"]["containers"] if c["name"] == "tritonserver")
        ports = {port["name"]: port["containerPort"] for port in triton["ports"]}
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        http_port = next((a.split("=")[1] for a in triton["command"] if a.startswith("--http-port=")), "8000")
        assert ports["http"] == int(http_port) and ports["grpc"] == 8001
        assert triton["resources"]["requests"]["nvidia.com/gpu"] == 1, f"{name} asks for its GPU"
    for service in (doc for doc in documents if doc["kind"] == "Service"):
        pod = next(d["spec"]["template"] for d in deployments.values()
                   if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items())
        names = {port["name"] for c in pod["spec"]["containers"] for port in c.get("ports", [])}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= names, service["metadata"]["name"]
    assert next(d for d in documents if d["metadata"]["name"] == "vit" and d["kind"] == "Service")["spec"][
        "clusterIP"] == "None", "headless: the name resolves to every ViT pod"
    llm_init = deployments["llm"]["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert llm_init[llm_init.index("--vit-endpoints") + 1] == "vit:8001"
    hpa = next(doc for doc in documents if doc["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "nv_inference_pending_request_count"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_builds_the_kustomization_offline():
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    images = set(re.findall(r"image: (\S+)", built.stdout))
    assert images == {"registry.example.com/vlmserve:server", "registry.example.com/vlmserve:builder"}
