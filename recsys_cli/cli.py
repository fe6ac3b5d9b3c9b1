"""``recsys``: the project's command line.

Every command resolves its settings from the environment (``recsys_core.settings``), makes
``RECSYS_HOME`` absolute and hands it to the processes it starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable

import click

import recsys_assets  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from recsys_cli.stack.services import (
    REPO_ROOT,
    ensure_home,
    init_dagster_storage,
    init_mlflow_storage,
    stack_services,
)
from recsys_cli.stack.supervisor import SUPERVISOR, ServiceSpec, Stack, StackError
from recsys_core.settings import Settings, load_settings


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


@click.group()
@click.option(
    "--home", envvar="RECSYS_HOME", default=".recsys", show_default=True, help="Root of every embedded store."
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def cli(ctx: click.Context, home: str, verbose: bool) -> None:
    """A self-retraining music recommender on Dagster, MLflow and BentoML."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ["RECSYS_HOME"] = home
    settings = load_settings()
    # Children (webserver, daemon, run workers) must resolve the very same locations.
    os.environ.update(settings.child_env({}))
    ctx.obj = settings


# --- the local stack ----------------------------------------------------------------------------


def _with_ports(settings: Settings, **ports: int | None) -> Settings:
    overrides = {name: port for name, port in ports.items() if port is not None}
    if not overrides:
        return settings
    env = settings.child_env()
    env.update({f"RECSYS_{name.upper()}_PORT": str(port) for name, port in overrides.items()})
    env.pop("RECSYS_SERVING_URL", None)
    new = load_settings(env)
    os.environ.update(new.child_env({}))
    return new


def start_stack(
    settings: Settings, *, with_mlflow: bool = True, with_prometheus: bool = True, with_bento: bool = True
) -> Stack:
    """Start the local stack and print where each service answers."""
    ensure_home(settings)
    init_dagster_storage(settings)
    init_mlflow_storage(settings)
    if with_prometheus and shutil.which("prometheus") and not settings.prometheus_url:
        # The stack's Prometheus is where the Dagster processes read the online KPIs.
        os.environ["PROMETHEUS_URL"] = settings.url("prometheus")
        settings = load_settings()
    stack = Stack(settings.run_dir, settings.child_env(), cwd=REPO_ROOT, host=settings.host)
    specs = stack_services(settings, with_mlflow=with_mlflow, with_prometheus=with_prometheus, with_bento=with_bento)
    click.echo(f"RECSYS_HOME={settings.home}")
    click.echo("starting " + ", ".join(s.name for s in specs) + " …")
    stack.start(specs)
    for record in stack.records:
        where = record.url or "(no UI)"
        click.echo(f"  {record.name:<18} {where:<28} pid {record.pid}  log {record.log}")
    return stack


def wait_until_interrupted(stack: Stack, echo: Callable[[str], None] = click.echo, stop: bool = True) -> int:
    """Supervise the stack (restart what dies, with backoff; rotate the logs) until Ctrl-C or SIGTERM;
    then stop everything (unless ``stop`` is false: `recsys down` does it)."""
    stopping = {"signal": None}

    def _on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    last_refresh = 0.0
    while stopping["signal"] is None:
        time.sleep(0.5)
        if time.monotonic() - last_refresh > 10:
            stack.refresh_children()
            last_refresh = time.monotonic()
        for line in stack.supervise():
            echo(line)
    if not stop:
        return 0
    echo("stopping the stack …")
    stopped = stack.stop()
    echo("stopped " + (", ".join(stopped) if stopped else "nothing"))
    return 0


@cli.command()
@click.option("--dagster-port", type=int, help="Dagster UI port [env RECSYS_DAGSTER_PORT, default 3000].")
@click.option("--mlflow-port", type=int, help="MLflow UI port [env RECSYS_MLFLOW_PORT, default 5000].")
@click.option("--bento-port", type=int, help="BentoML port [env RECSYS_BENTO_PORT, default 3001].")
@click.option("--prometheus-port", type=int, help="Prometheus port [env RECSYS_PROMETHEUS_PORT, default 9090].")
@click.option("--no-mlflow", is_flag=True, help="Do not start the MLflow UI.")
@click.option("--no-prometheus", is_flag=True, help="Do not start Prometheus even if it is installed.")
@click.option("--no-bento", is_flag=True, help="Do not start the recommendation service.")
@click.option("--detach", is_flag=True, help="Start, print the URLs and return; stop with `recsys down`.")
@click.pass_context
def up(
    ctx: click.Context,
    dagster_port: int | None,
    mlflow_port: int | None,
    bento_port: int | None,
    prometheus_port: int | None,
    no_mlflow: bool,
    no_prometheus: bool,
    no_bento: bool,
    detach: bool,
) -> None:
    """Start the Dagster UI and daemon, the MLflow UI and Prometheus on 127.0.0.1."""
    settings = _with_ports(
        _settings(ctx), dagster=dagster_port, mlflow=mlflow_port, bento=bento_port, prometheus=prometheus_port
    )
    try:
        stack = start_stack(
            settings, with_mlflow=not no_mlflow, with_prometheus=not no_prometheus, with_bento=not no_bento
        )
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    if detach:
        try:
            stack.start([ServiceSpec(SUPERVISOR, SUPERVISE_ARGV)], adding=True)
        except StackError as exc:
            stack.stop()
            raise click.ClickException(str(exc)) from exc
        click.echo("running in the background, supervised (a process that dies is restarted): "
                   "`recsys status` shows it, `recsys down` stops it")  # fmt: skip
        return
    click.echo("Ctrl-C stops everything")
    sys.exit(wait_until_interrupted(stack))


SUPERVISE_ARGV = [sys.executable, "-m", "recsys_cli.cli", "supervise"]


@cli.command(hidden=True)
@click.pass_context
def supervise(ctx: click.Context) -> None:
    """Supervise a detached stack (started by `recsys up --detach`; stopped by `recsys down`)."""
    settings = _settings(ctx)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    deadline = time.monotonic() + 30
    while True:  # `recsys up` records this process right after starting it
        stack = Stack.load(settings.run_dir, settings.child_env(), cwd=REPO_ROOT, host=settings.host)
        if any(r.name == SUPERVISOR and r.pid == os.getpid() for r in stack.records):
            break
        if time.monotonic() > deadline:
            raise click.ClickException(f"this process is not recorded in {stack.state_file}")
        time.sleep(0.2)
    sys.exit(wait_until_interrupted(stack, echo=lambda line: click.echo(line, err=True), stop=False))


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every process that `recsys up` started in this RECSYS_HOME."""
    settings = _settings(ctx)
    stack = Stack.load(settings.run_dir, settings.child_env(), cwd=REPO_ROOT, host=settings.host)
    stopped = stack.stop()
    click.echo("stopped " + (", ".join(stopped) if stopped else "nothing (no stack was running)"))


@cli.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the processes of the local stack."""
    settings = _settings(ctx)
    stack = Stack.load(settings.run_dir, settings.child_env(), cwd=REPO_ROOT, host=settings.host)
    if not stack.records:
        click.echo("no stack is running")
        return
    for record in stack.records:
        restarts = f"restarts {record.restarts_total}" + (f" (last: {record.last_exit})" if record.last_exit else "")
        click.echo(f"{record.name:<18} {record.state:<10} pid {record.pid:<8} {record.url or '':<28} {restarts}")


# --- data ---------------------------------------------------------------------------------------


@cli.group()
def data() -> None:
    """Put listening data into the warehouse: simulate, stream, import."""


def _warehouse(settings: Settings):
    from recsys_core.warehouse import Warehouse

    return Warehouse(settings.warehouse_uri)


def _parse_end(value: str | None):
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        end = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint="--end") from None
    return end if end.tzinfo else end.replace(tzinfo=UTC)


@data.command()
@click.option("--users", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--tracks", default=5000, show_default=True, type=click.IntRange(1))
@click.option("--days", default=90, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--end", help="End of the history, ISO 8601 [default: today 00:00 UTC].")
@click.option("--drift", help="A drift from --drift-at on, e.g. taste_shift=0.5,new_genre=0.3.")
@click.option(
    "--drift-at", default=0.7, show_default=True, type=click.FloatRange(0, 1), help="Fraction of the history."
)
@click.pass_context
def simulate(
    ctx: click.Context,
    users: int,
    tracks: int,
    days: int,
    seed: int,
    end: str | None,
    drift: str | None,
    drift_at: float,
) -> None:
    """Write a simulated catalogue and listening history into the warehouse."""
    from recsys_sim.simulation import simulate_history
    from recsys_sim.simulator import Drift

    settings = _settings(ctx)
    ensure_home(settings)
    try:
        drift_spec = Drift.parse(drift)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--drift") from None
    started = time.perf_counter()

    def progress(done: int, expected: float) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        click.echo(f"  landed {done:>12,} events (~{min(done / max(expected, 1), 1):.0%}), {rate:,.0f} events/s")

    report = simulate_history(
        _warehouse(settings), settings.home, users=users, tracks=tracks, days=days, seed=seed,
        end=_parse_end(end), drift=drift_spec, drift_at=drift_at, progress=progress,
    )  # fmt: skip
    click.echo(
        f"simulated {report.events:,} events of {report.users:,} users over {report.tracks:,} tracks in "
        f"{report.seconds:.1f}s ({report.events_per_second:,.0f} events/s; generation alone "
        f"{report.events / max(report.generate_seconds, 1e-9):,.0f} events/s), {len(report.batches)} batches"
    )


@data.command()
@click.option(
    "--rate",
    default=200.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Events per second.",
)
@click.option(
    "--interval",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between batches.",
)
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds [default: until Ctrl-C].")
@click.option("--drift", help="Apply a drift first, e.g. taste_shift=0.6.")
@click.pass_context
def stream(ctx: click.Context, rate: float, interval: float, duration: float | None, drift: str | None) -> None:
    """Keep appending new simulated events to the warehouse (for sensor demos)."""
    from recsys_sim.simulation import stream as run_stream
    from recsys_sim.simulator import Drift

    settings = _settings(ctx)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        drift_spec = Drift.parse(drift)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--drift") from None
    try:
        total = run_stream(
            _warehouse(settings), settings.home, rate=rate, interval=interval, duration=duration, drift=drift_spec,
            on_batch=lambda r: click.echo(f"  batch {r.batch_id}: {r.landed:,} events landed"),
            should_stop=lambda: stop["now"],
        )  # fmt: skip
    except KeyboardInterrupt:
        click.echo("stopped")
        return
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"streamed {total:,} events")


@data.command(name="import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(["movielens", "lastfm-1k", "listenbrainz", "csv"]))
@click.argument("path", type=click.Path(path_type=str))
@click.option("--map", "mapping", help="For csv: contract_column=csv_column,… (user_id, track_id, played_at required).")
@click.option(
    "--chunk-lines",
    default=500_000,
    show_default=True,
    type=click.IntRange(1),
    help="Lines per landed batch.",
)
@click.pass_context
def import_(ctx: click.Context, fmt: str, path: str, mapping: str | None, chunk_lines: int) -> None:
    """Import a public dataset file into the warehouse (idempotent)."""
    from pathlib import Path

    from recsys_assets.data.importers import UnreadableFileError, import_file, parse_mapping

    settings = _settings(ctx)
    ensure_home(settings)
    try:
        columns = parse_mapping(mapping) if fmt == "csv" else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--map") from None
    if fmt != "csv" and mapping:
        raise click.BadParameter("only the csv format takes a mapping", param_hint="--map")
    started = time.perf_counter()

    def progress(done: int, size: int, report) -> None:
        note = " (already imported, skipped)" if report.skipped else ""
        click.echo(f"  {done / max(size, 1):6.1%} of {size:,} bytes, batch {report.batch_id}: {report.landed:,} landed, "  # noqa: E501
                   f"{report.quarantined:,} quarantined, {report.duplicates:,} duplicates{note}")  # fmt: skip

    try:
        report = import_file(
            _warehouse(settings), fmt, Path(path), mapping=columns, chunk_lines=chunk_lines, progress=progress
        )
    except UnreadableFileError as exc:
        raise click.ClickException(str(exc)) from exc
    totals = report.totals
    click.echo(
        f"imported {path} as {fmt} in {time.perf_counter() - started:.1f}s: {totals['rows_in']:,} rows in, "
        f"{totals['landed']:,} landed, {totals['quarantined']:,} quarantined, {totals['duplicates']:,} duplicates"
    )


@data.command(name="status")
@click.pass_context
def data_status(ctx: click.Context) -> None:
    """Count what the warehouse holds."""
    wh = _warehouse(_settings(ctx))
    wh.init_schema()
    for table in ("listening_events", "tracks", "users", "quarantine", "ingest_batches"):
        click.echo(f"{table:<18} {wh.scalar(f'SELECT COUNT(*) FROM {table}'):>12,}")


# --- the model registry -------------------------------------------------------------------------


@cli.group()
def model() -> None:
    """The MLflow model registry: list versions, promote, roll back."""


def _registry(settings: Settings):
    """The control plane: the one writer of aliases and the canary plan (the service only reads)."""
    from recsys_core.control import ControlPlane

    root = settings.mlflow_artifact_root
    return ControlPlane(settings.mlflow_tracking_uri, root, settings.home / "models" / "registry")


def _who() -> str:
    import getpass

    return f"{getpass.getuser()} via recsys CLI"


@model.command(name="list")
@click.option("--history", is_flag=True, help="Show every alias move of every version.")
@click.pass_context
def model_list(ctx: click.Context, history: bool) -> None:
    """List the versions of recsys-two-tower with their aliases, status and lineage."""
    from recsys_core.registry import MODEL_NAME, RegistryError

    try:
        versions = _registry(_settings(ctx)).versions()
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    if not versions:
        click.echo(f"{MODEL_NAME} has no versions yet")
        return
    click.echo(
        f"{'version':>7}  {'aliases':<20} {'status':<12} {'created (UTC)':<20} {'cutoff':<26} {'train rows':>10}"
    )
    for v in versions:
        rows = v.lineage("train_interactions") or "-"
        click.echo(
            f"{v.version:>7}  {','.join(v.aliases) or '-':<20} {v.status or '-':<12} "
            f"{v.created_at:%Y-%m-%d %H:%M:%S}  {v.lineage('cutoff') or '-':<26} {rows:>10}"
        )
        if history:
            for event in v.history:
                move = f"{event['action']} (from {event['from']} to {event['to']})"
                click.echo(f"{'':>9}{event['at']}  {move}: {event['reason']} [{event['by']}]")


@model.command(name="promote")
@click.option("--version", "version", type=int, help="The version to make champion [default: the challenger].")
@click.option("--reason", default="promoted by hand", show_default=True)
@click.pass_context
def model_promote(ctx: click.Context, version: int | None, reason: str) -> None:
    """Make a version (default: the challenger) the champion."""
    from recsys_core.registry import RegistryError

    try:
        promoted = _registry(_settings(ctx)).promote(version, reason=reason, by=_who())
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"champion is now version {promoted.version}")


@model.command(name="rollback")
@click.option("--to", "to", type=int, help="The version to make champion [default: the previous champion].")
@click.option("--reason", default="rolled back by hand", show_default=True)
@click.pass_context
def model_rollback(ctx: click.Context, to: int | None, reason: str) -> None:
    """Move the champion alias back to an earlier version, atomically, and record it."""
    from recsys_core.registry import RegistryError

    try:
        champion = _registry(_settings(ctx)).rollback(to, reason=reason, by=_who())
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"champion is now version {champion.version}")


@model.command(name="reject")
@click.option("--reason", default="rejected by hand", show_default=True)
@click.pass_context
def model_reject(ctx: click.Context, reason: str) -> None:
    """Roll the challenger back (end its canary); the champion stays."""
    from recsys_core.registry import RegistryError

    try:
        rejected = _registry(_settings(ctx)).reject_challenger(reason=reason, by=_who())
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"challenger version {rejected.version} rolled back")


@model.command(name="canary")
@click.option("--fraction", type=click.FloatRange(0, 1), help="Set the challenger's share of users (every replica).")
@click.option("--reason", default="set by hand", show_default=True)
@click.pass_context
def model_canary(ctx: click.Context, fraction: float | None, reason: str) -> None:
    """Show the canary's traffic plan, or set its fraction (held in the registry)."""
    from recsys_core.registry import RegistryError

    registry = _registry(_settings(ctx))
    try:
        state = registry.serving_state()
        if fraction is not None:
            if state.challenger is None:
                raise click.ClickException("there is no challenger to canary")
            current = state.canary if state.canary and state.canary.version == state.challenger else None
            registry.set_canary(state.challenger, step=current.step if current else 0, fraction=fraction,
                                mode=state.mode, reason=reason, by=_who())  # fmt: skip
            state = registry.serving_state()
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    if state.challenger is None:
        click.echo(f"no challenger; champion v{state.champion}")
        return
    step = f", step {state.canary.step}" if state.canary and state.canary.version == state.challenger else ""
    click.echo(f"challenger v{state.challenger} gets {state.fraction:.0%} of users ({state.mode}{step}); "
               f"champion v{state.champion}")  # fmt: skip


# --- simulated traffic --------------------------------------------------------------------------


@cli.command()
@click.option("--users", default=2000, show_default=True, type=click.IntRange(1), help="Distinct simulated users.")
@click.option(
    "--rps", default=50.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Requests per second."
)
@click.option(
    "--duration", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds."
)
@click.option("--k", default=10, show_default=True, type=click.IntRange(1, 100), help="Items per request.")
@click.option("--url", help="The service [default: RECSYS_SERVING_URL].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.pass_context
def traffic(ctx: click.Context, users: int, rps: float, duration: float, k: int, url: str | None, seed: int) -> None:
    """Call the endpoint as simulated users and send their feedback (clicks, plays, skips, likes)."""
    import asyncio

    import numpy as np

    from recsys_sim.simulation import LiveWorld, world_dir
    from recsys_sim.simulator import World
    from recsys_sim.traffic import Behaviour, run_traffic

    settings = _settings(ctx)
    url = url or settings.serving_url
    try:
        world = LiveWorld(world_dir(settings.home))
    except FileNotFoundError:
        world = None
        click.echo("no simulated world: clicks use a flat 5% probability and user ids are synthetic")
    if world is not None:
        ids = World.user_id(np.random.default_rng(seed).choice(world.n_users, min(users, world.n_users), replace=False))
        user_ids = list(ids)
        behaviour = Behaviour(world.click_probability, world.affinity, seed=seed)
    else:
        user_ids = [f"visitor-{i}" for i in range(users)]
        behaviour = Behaviour(None, None, seed=seed)
    click.echo(f"{len(user_ids):,} users, {rps:g} requests/s for {duration:g}s against {url}")
    report = asyncio.run(
        run_traffic(
            url,
            user_ids,
            behaviour,
            rps=rps,
            duration=duration,
            k=k,
            on_progress=lambda r: click.echo(f"  {r.requests:,} requests, {r.failures} failed"),
        )
    )
    click.echo(report.summary())
    if report.errors:
        click.echo(f"errors: {dict(report.errors)}", err=True)
    if report.requests == 0:
        raise click.ClickException(f"no request reached {url}: is the service up (`recsys up`)?")


# --- the asset graph ----------------------------------------------------------------------------


@cli.command()
@click.argument("selection", required=False, default="*")
@click.pass_context
def materialize(ctx: click.Context, selection: str) -> None:
    """Materialize SELECTION (Dagster selection syntax, default: everything) in this process."""
    from recsys_cli.runner import materialize_selection

    settings = _settings(ctx)
    ensure_home(settings)
    try:
        results = materialize_selection(selection)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for result in results:
        if not result.success:
            raise click.ClickException(f"the run {result.run_id} failed; see the Dagster UI or the log above")
        click.echo(f"run {result.run_id} succeeded")


@cli.command()
@click.option(
    "--users",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Simulated users, if the warehouse is empty.",
)
@click.option(
    "--tracks",
    default=4000,
    show_default=True,
    type=click.IntRange(1),
    help="Simulated tracks, if the warehouse is empty.",
)
@click.option(
    "--days",
    default=30,
    show_default=True,
    type=click.IntRange(1),
    help="Days of simulated history, if the warehouse is empty.",
)
@click.option("--stream-rate", default=150.0, show_default=True, type=float, help="New events per second.")
@click.option("--traffic-rps", default=15.0, show_default=True, type=float, help="Simulated requests per second.")
@click.option(
    "--drift",
    default="taste_shift=0.7",
    show_default=True,
    help="Drift injected after the first canary decision ('' for none).",
)
@click.option("--duration", type=float, help="Stop after this many seconds [default: until Ctrl-C].")
@click.pass_context
def demo(ctx: click.Context, users: int, tracks: int, days: int, stream_rate: float, traffic_rps: float,
         drift: str, duration: float | None) -> None:  # fmt: skip
    """The closed loop, unattended: simulate, train, serve, stream, retrain, canary, drift.

    Starts the local stack (the Dagster daemon runs every trigger), simulates a history if the
    warehouse is empty, then plays the world (new events, simulated users, a drift) and narrates what
    the platform does by itself. Watch it in the Dagster UI (runs, sensors, asset metadata) and the
    MLflow UI (versions and aliases). Ctrl-C stops everything.
    """
    from recsys_cli.demo import DEMO_ENVIRONMENT, play_world
    from recsys_sim.simulation import simulate_history
    from recsys_sim.simulator import Drift

    for name, value in DEMO_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    settings = load_settings()
    try:
        drift_spec = Drift.parse(drift)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--drift") from None
    try:
        stack = start_stack(settings)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = load_settings()
    stop = {"now": False}
    started = time.monotonic()

    def _on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        warehouse = _warehouse(settings)
        warehouse.init_schema()
        if not warehouse.scalar("SELECT COUNT(*) FROM listening_events"):
            click.echo(f"the warehouse is empty: simulating {days} days of {users:,} users over {tracks:,} tracks …")
            report = simulate_history(warehouse, settings.home, users=users, tracks=tracks, days=days, seed=42)
            click.echo(f"  {report.events:,} events landed in {report.seconds:.1f}s")
        click.echo(
            f"the loop runs by itself now: open {settings.url('dagster')} (runs, sensors, assets) and "
            f"{settings.url('mlflow')} (models); Ctrl-C stops everything"
        )
        play_world(
            warehouse=warehouse,
            registry=_registry(settings),
            home=settings.home,
            serving_url=settings.serving_url,
            stream_rate=stream_rate,
            traffic_rps=traffic_rps,
            echo=click.echo,
            drift=drift_spec,
            should_stop=lambda: stop["now"] or (duration is not None and time.monotonic() - started > duration),
        )
    finally:
        click.echo("stopping the stack …")
        click.echo("stopped " + ", ".join(stack.stop()))


def main() -> None:
    cli(prog_name="recsys")


if __name__ == "__main__":
    main()
