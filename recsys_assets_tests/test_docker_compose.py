"""docker-compose.yml cannot run here (no Docker engine): check what can be checked without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from recsys_assets_tests.conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
EXPECTED_SERVICES = {
    "postgres", "user-code", "dagster-webserver", "dagster-daemon", "mlflow", "bento", "prometheus", "grafana",
}  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_service_of_the_design_is_there(compose: dict) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_every_service_has_an_image_or_a_buildable_dockerfile(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            dockerfile = REPO_ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY ") and "--from" not in line:
                    for source in line.split()[1:-1]:
                        assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is missing"


def test_mounted_files_and_env_files_exist(compose: dict) -> None:
    named_volumes = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source in named_volumes or source == "/var/run/docker.sock":  # the host's Docker socket
                continue
            assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which is missing"
        for env_file in service.get("env_file", []):
            if isinstance(env_file, dict) and not env_file.get("required", True):
                continue
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (REPO_ROOT / path).is_file(), f"{name} needs {path}"


def test_published_ports_do_not_collide(compose: dict) -> None:
    published: dict[str, str] = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 1)[0]
            assert host not in published, f"{name} and {published.get(host)} both publish {host}"
            published[host] = name
    assert {"3000", "3001", "5000", "9090"} <= set(published)


def test_dependencies_exist_and_wait_for_health_where_there_is_a_healthcheck(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert all("healthcheck" in s for s in services.values())


def test_grafana_is_provisioned_with_a_dashboard_on_the_prometheus_datasource() -> None:
    datasource = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((REPO_ROOT / "deploy/grafana/dashboards/recsys.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for kpi in ("CTR", "Conversion", "Rejection", "Precision", "latency"):
        assert kpi in titles
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}


def test_the_image_runs_the_code_location_the_workspace_names() -> None:
    workspace = yaml.safe_load((REPO_ROOT / "deploy/dagster/workspace.docker.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["host"] == "user-code"
    assert Path(REPO_ROOT / "deploy/dagster/dagster.yaml").is_file()


def test_the_registry_is_behind_authentication(compose: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    assert "--app-name basic-auth" in mlflow["command"]
    config = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    mounted = {m.split(":")[1]: m.split(":")[0] for m in mlflow["volumes"] if m.startswith("./")}
    assert (REPO_ROOT / mounted[config]).is_file()
    example = (REPO_ROOT / "deploy" / "compose.env.example").read_text()
    assert {"MLFLOW_TRACKING_USERNAME=", "MLFLOW_TRACKING_PASSWORD="} <= {line.split("=")[0] + "=" for line in
                                                                         example.splitlines()}  # fmt: skip


def test_the_user_code_image_holds_every_package_the_project_installs() -> None:
    """`pip install .` in the image installs only the packages copied into it: the code location imports
    the simulator (the evaluation's simulated CTR), and the image ships the `recsys` command."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    user_code = dockerfile[dockerfile.index("COPY pyproject.toml") :]
    assert {p for p in packages if f"COPY {p} ./{p}" not in user_code} == set()
