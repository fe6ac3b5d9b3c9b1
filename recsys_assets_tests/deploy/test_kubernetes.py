"""The deployment side, validated without a cluster or a Docker engine: every manifest under deploy/k8s against the
schemas of Kubernetes 1.37 (kubernetes-validate, strict: an unknown field fails), the pods that the
Helm values and the training step's tag put in Kubernetes, built by dagster-k8s itself, against the
same schemas, and the Dagster instance files against Dagster's own config schema."""

from __future__ import annotations

import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from recsys_assets_tests.conftest import REPO_ROOT

KUBERNETES = "1.37"
SAMPLE = {"IMAGE": "registry.example.com/recommender:1", "BENTO_TAG": "recommender:abc", "CHAMPION_VERSION": "3",
          "CHALLENGER_VERSION": "4", "WAL_CLAIM": "wal-recommender-4"}  # fmt: skip
MANIFESTS = sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    """The file's documents, its ``${PLACEHOLDERS}`` (what model_deployment renders) filled in; a
    shell's ``$VAR`` in a command is left alone."""
    rendered = re.sub(r"\$\{(\w+)\}", lambda m: SAMPLE[m.group(1)], path.read_text())  # each must be known
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_service_has_probes_an_autoscaler_and_a_disruption_budget() -> None:
    kinds = {doc["kind"]: doc for doc in documents(REPO_ROOT / "deploy" / "k8s" / "recommender.yaml")}
    assert {"StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    pod = kinds["StatefulSet"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(container)
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", kinds["StatefulSet"]["metadata"]["name"])


def test_each_replica_keeps_its_write_ahead_log_on_a_volume_that_outlives_the_pod() -> None:
    """The log on the replica's own claim (retained on scale-down), where the service writes it, and a
    grace period for the last landing; the recovery Job mounts such a claim and lands it."""
    kinds = {doc["kind"]: doc for doc in documents(REPO_ROOT / "deploy" / "k8s" / "recommender.yaml")}
    spec = kinds["StatefulSet"]["spec"]
    claim = spec["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["RECSYS_FEEDBACK_LOG_DIR"] == mounts[claim["metadata"]["name"]]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    job = documents(REPO_ROOT / "deploy" / "k8s" / "wal-recovery.yaml")[0]
    land = job["spec"]["template"]["spec"]["containers"][0]
    assert land["command"][-2:] == [env["RECSYS_FEEDBACK_LOG_DIR"], "--once"]
    assert land["volumeMounts"][0]["mountPath"] == env["RECSYS_FEEDBACK_LOG_DIR"]


def test_the_registry_runs_behind_basic_auth() -> None:
    kinds = {doc["kind"]: doc for doc in documents(REPO_ROOT / "deploy" / "k8s" / "mlflow.yaml")}
    args = " ".join(kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--app-name basic-auth" in args


def _k8s_job(user_defined: dict, image: str) -> dict:
    """The Job dagster-k8s launches for a step with ``user_defined`` config (its own builder)."""
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job
    from kubernetes.client import ApiClient

    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(job_image=image, dagster_home="/opt/dagster/home"),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-recsys",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(user_defined),
        pod_name="dagster-step-recsys",
    )
    return ApiClient().sanitize_for_serialization(job)


def test_the_training_step_gets_its_own_pod_with_a_gpu() -> None:
    from recsys_assets.constants import TRAINING_POD

    job = _k8s_job(TRAINING_POD["dagster-k8s/config"], "registry.example.com/recsys-assets-gpu:1")
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_helm_values_run_each_run_in_its_own_pod_on_postgres_with_run_monitoring() -> None:
    values = yaml.safe_load((REPO_ROOT / "deploy" / "helm" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    assert values["postgresql"]["postgresqlDatabase"] == "dagster"
    (location,) = values["dagster-user-deployments"]["deployments"]
    assert location["dagsterApiGrpcArgs"] == ["--module-name", "recsys_assets.definitions"]
    # What the run launcher's config puts in each run's pod, built by dagster-k8s and validated.
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    run_config = {"container_config": _snake(k8s["containerConfig"]), "pod_spec_config": _snake(k8s["podSpecConfig"])}
    job = _k8s_job(run_config, f"{location['image']['repository']}:{location['image']['tag']}")
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    # The code location's own container resources are Kubernetes resources too.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "recsys"},
           "spec": {"containers": [{"name": "recsys", "image": "x", "resources": location["resources"]}]}}  # fmt: skip
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def _snake(value):
    """The chart's camelCase keys → dagster-k8s's snake_case (what the chart's template does)."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in value.items()}


@pytest.mark.parametrize("path", ["deploy/dagster/dagster.yaml"])
def test_the_dagster_instance_files_are_valid_dagster_config(path: str, tmp_path: Path) -> None:
    """Dagster's own schema for dagster.yaml (storage, run launcher, coordinator, monitoring)."""
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.launcher import RunLauncher
    from dagster._serdes import ConfigurableClassData

    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / path).read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_monitoring"]["enabled"] is True
    launcher = config["run_launcher"]  # its own config schema, checked by building it (no Docker needed)
    built = ConfigurableClassData(launcher["module"], launcher["class"], yaml.safe_dump(launcher["config"]))
    assert type(built.rehydrate(as_type=RunLauncher)).__name__ == "DockerRunLauncher"


def test_on_kubernetes_each_step_of_a_retrain_runs_in_its_own_pod() -> None:
    import subprocess
    import sys

    probe = ("from recsys_assets.definitions import defs; "
             "print(getattr(defs().resolve_job_def('retrain').executor_def, 'name', None))")  # fmt: skip
    for executor, expected in (("k8s", "k8s"), ("default", "in_process")):  # in_process: the Definitions' default
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**os.environ, "RECSYS_EXECUTOR": executor}, cwd=REPO_ROOT)  # fmt: skip
        assert done.stdout.strip().splitlines()[-1] == expected


def test_the_spark_executors_template_is_a_valid_pod_with_the_s3_credentials() -> None:
    (template,) = documents(REPO_ROOT / "deploy" / "spark" / "executor-pod-template.yaml")
    kubernetes_validate.validate(template, KUBERNETES, strict=True)
    container = template["spec"]["containers"][0]
    assert container["name"] == "spark-kubernetes-executor"  # the container Spark fills in
    assert {"secretRef": {"name": "recsys-secrets"}} in container["envFrom"]


def test_the_preparation_step_is_a_spark_driver_that_executors_can_reach(monkeypatch) -> None:
    """The step's pod (built by dagster-k8s) runs as the Spark service account and knows its address; the
    ConfigMap's settings give a spark-submit on Kubernetes in client mode with the executors' template
    from the image, and s3a paths for the bucket."""
    from recsys_assets.constants import PREPARATION_POD
    from recsys_assets.data.store import spark_uri
    from recsys_assets.resources import PreparationEngineResource
    from recsys_core.settings import load_settings, storage_path

    job = _k8s_job(PREPARATION_POD["dagster-k8s/config"], "registry.example.com/recsys-assets:1")
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    pod = job["spec"]["template"]["spec"]
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in documents(REPO_ROOT / "deploy" / "k8s" / "spark.yaml")}
    assert pod["serviceAccountName"] == "recsys-spark"
    assert ("ServiceAccount", "recsys-spark") in kinds
    binding = kinds[("RoleBinding", "recsys-spark-driver")]
    assert binding["subjects"][0]["name"] == "recsys-spark"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    config = kinds[("ConfigMap", "recsys-spark")]["data"]
    settings = load_settings({**config, "RECSYS_HOME": "/data/recsys"}).preparation
    assert settings.engine == "spark"
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    monkeypatch.setenv("POD_NAME", "dagster-step-abc")
    resource = PreparationEngineResource(
        engine=settings.engine, spark_master=settings.spark_master, spark_conf=settings.spark_conf
    )
    command = resource.submit_command("clean")
    conf = dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--conf")
    assert command[command.index("--master") + 1] == "k8s://https://kubernetes.default.svc:443"
    assert conf["spark.driver.host"] == "10.1.2.3"
    assert conf["spark.kubernetes.driver.pod.name"] == "dagster-step-abc"
    template = conf["spark.kubernetes.executor.podTemplateFile"]
    assert template.startswith("/opt/recsys/")  # the image's WORKDIR, where the Dockerfile copies deploy/spark
    assert (REPO_ROOT / template.removeprefix("/opt/recsys/")).exists()
    assert "COPY deploy/spark ./deploy/spark" in (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert "EnvironmentVariableCredentialsProvider" in conf["spark.hadoop.fs.s3a.aws.credentials.provider"]
    assert command[-1].endswith("recsys_assets/spark_jobs/prepare.py")
    # The bucket's objects as the job reads them: s3a://, Hadoop's connector.
    assert spark_uri(storage_path("s3://recsys-artifacts/prod") / "prepared" / "x.parquet") == (
        "s3a://recsys-artifacts/prod/prepared/x.parquet"
    )


def test_the_helm_values_give_every_run_the_spark_settings() -> None:
    values = yaml.safe_load((REPO_ROOT / "deploy" / "helm" / "values.yaml").read_text())
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]["envConfigMaps"]
    location = values["dagster-user-deployments"]["deployments"][0]["envConfigMaps"]
    assert {"name": "recsys-spark"} in launcher
    assert {"name": "recsys-spark"} in location


def test_a_training_on_several_pods_is_an_indexed_job_whose_pods_find_each_other() -> None:
    import json

    from recsys_assets.constants import TRAINING_POD
    from recsys_assets.ml.distribute import WORKER_PORT, indexed_tf_config, render_kubernetes_job

    templates = documents(REPO_ROOT / "deploy" / "k8s" / "training.yaml")
    service, job = render_kubernetes_job(templates, "recsys-train-0a1b2c3d", 3, ["--train", "s3://b/train.parquet"])
    for doc in (service, job):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    spec, pod = job["spec"], job["spec"]["template"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        3,
        3,
        0,
    )
    # The headless Service is the pods' subdomain and selects exactly this training's pods.
    assert service["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [WORKER_PORT] == [service["spec"]["ports"][0]["port"]]
    args = container["args"]
    assert args[:2] == ["--train", "s3://b/train.parquet"]
    peers, workers = args[args.index("--peers") + 1], int(args[args.index("--workers") + 1])
    # Pod 2's TF_CONFIG (what the worker builds from JOB_COMPLETION_INDEX): every pod by its stable name.
    config = json.loads(indexed_tf_config(peers, workers, 2))
    assert config["cluster"]["worker"] == [
        f"recsys-train-0a1b2c3d-{i}.recsys-train-0a1b2c3d:{WORKER_PORT}" for i in range(3)
    ]
    assert config["task"] == {"type": "worker", "index": 2}
    # The training step's pod may create them: it runs as the account the Role is bound to.
    kinds = {doc["kind"]: doc for doc in templates}
    account = TRAINING_POD["dagster-k8s/config"]["pod_spec_config"]["service_account_name"]
    assert kinds["RoleBinding"]["subjects"][0]["name"] == account == kinds["ServiceAccount"]["metadata"]["name"]
    assert {"create", "delete"} <= set(kinds["Role"]["rules"][0]["verbs"])
    # The step reads the template from the image, where the Dockerfile puts it.
    from recsys_assets.resources import TrainingResource

    template = Path(TrainingResource.model_fields["job_template"].default).relative_to("/opt/recsys")
    assert f"COPY deploy/k8s/training.yaml ./{template}" in (REPO_ROOT / "deploy" / "Dockerfile").read_text()
