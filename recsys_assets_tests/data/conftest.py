"""Warehouse fixtures: the embedded DuckDB file and a real PostgreSQL server, through the same code."""

from __future__ import annotations

import itertools
from pathlib import Path

import psycopg
import pytest

from recsys_core.warehouse import Warehouse

_databases = itertools.count()


@pytest.fixture(params=["duckdb", "postgres"])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Warehouse:
    """An empty warehouse with the contract's tables, of each kind."""
    if request.param == "duckdb":
        wh = Warehouse(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"wh_{next(_databases)}"
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        wh = Warehouse(server.get_uri(database=name))
    wh.init_schema()
    return wh
