"""The alert rules, checked and unit-tested by the real promtool (Debian's prometheus package)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from recsys_assets_tests.conftest import REPO_ROOT

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make test` installs it (scripts/test-setup.sh)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_the_alerts_fire_when_they_should_and_only_then() -> None:
    result = promtool("test", "rules", str(RULES.with_name("alerts_test.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_retrain_alerts_are_labelled_for_the_sensor() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    labelled = {r["alert"] for r in rules if r.get("labels", {}).get("retrain") == "true"}
    assert labelled == {"RecsysCTRBelowWeeklyLevel", "RecsysRejectionRateRising"}


@pytest.mark.parametrize("path", ["prometheus.yml"])
def test_the_compose_prometheus_config_is_valid(path: str) -> None:
    # promtool resolves rule_files relative to the config: check a copy next to the rules.
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / path).read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["bento:3001"]
