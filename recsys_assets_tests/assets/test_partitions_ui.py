"""The partitions as the Dagster UI shows them: their status read through a real webserver's GraphQL API."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime

import dagster as dg
import httpx
import pytest

from recsys_assets.data.store import batch_range_key
from recsys_assets.defs.ingestion.partitions import ingest_batches
from recsys_assets_tests.conftest import BIN, REPO_ROOT
from recsys_cli.stack.supervisor import free_port
from recsys_core.warehouse import Warehouse
from recsys_sim.simulation import simulate_history

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUERY = """
query PartitionStatus($path: [String!]!) {
  assetNodes(assetKeys: [{path: $path}]) {
    partitionKeys
    assetPartitionStatuses {
      ... on DefaultPartitionStatuses { materializedPartitions failedPartitions unmaterializedPartitions }
    }
  }
}
"""


def statuses(url: str, asset: str) -> dict:
    response = httpx.post(f"{url}/graphql", json={"query": QUERY, "variables": {"path": [asset]}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    (node,) = body["data"]["assetNodes"]
    return {"keys": node["partitionKeys"], **node["assetPartitionStatuses"]}


def test_the_webserver_shows_each_partitions_status(recsys_env, tmp_path) -> None:
    warehouse = Warehouse(recsys_env.warehouse_uri)
    end = datetime(2026, 2, 1, tzinfo=UTC)
    report = simulate_history(warehouse, recsys_env.home, users=40, tracks=150, days=28, seed=9, end=end, batch_rows=1)
    keys = [batch_range_key(b.batch_id, b.batch_id) for b in report.batches if b.landed]
    assert len(keys) >= 3
    broken = keys[1]
    from recsys_assets.definitions import defs

    job = defs().resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.get() as instance:  # DAGSTER_HOME of this test's RECSYS_HOME: what the UI reads
        instance.add_dynamic_partitions(ingest_batches.name, keys)
        for key in keys:
            assert job.execute_in_process(instance=instance, partition_key=key,
                                          asset_selection=[dg.AssetKey("listening_events")]).success  # fmt: skip
        (recsys_env.prepared_dir / "listening_events" / f"{broken}.parquet").write_bytes(b"corrupt")
        for key in keys:
            job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False,
                                   asset_selection=[dg.AssetKey("clean_listening_events")])  # fmt: skip

    url = f"http://127.0.0.1:{free_port()}"
    with (tmp_path / "webserver.log").open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1",
             "-p", url.rsplit(":", 1)[1]],
            cwd=REPO_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the webserver did not answer"
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        clean = statuses(url, "clean_listening_events")
        assert clean["keys"] == keys
        assert sorted(clean["materializedPartitions"]) == sorted(k for k in keys if k != broken)
        assert clean["failedPartitions"] == [broken]
        raw = statuses(url, "listening_events")
        assert sorted(raw["materializedPartitions"]) == sorted(keys)
        assert raw["failedPartitions"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
