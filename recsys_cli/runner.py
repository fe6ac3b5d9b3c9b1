"""Run the asset graph, or a selection of it, in this process against ``$DAGSTER_HOME``'s instance."""

from __future__ import annotations

import dagster as dg


def materialize_selection(selection: str = "*", *, raise_on_error: bool = False) -> dg.ExecuteInProcessResult:
    """Materialize ``selection`` (Dagster's asset selection syntax) and its checks.

    The run is recorded in the instance of ``$DAGSTER_HOME``, so it shows in the UI like any other.
    """
    from recsys_assets.definitions import defs

    asset_graph = defs.resolve_asset_graph()
    try:
        keys = dg.AssetSelection.from_string(selection).resolve(asset_graph, allow_missing=True)
    except dg.DagsterError as exc:  # the selection does not parse
        raise ValueError(f"the selection {selection!r} is not valid: {exc}") from exc
    materializable = sorted(k for k in keys if asset_graph.get(k).is_materializable)
    if not materializable:
        raise ValueError(f"the selection {selection!r} matches no materializable asset")
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(
            instance=instance,
            asset_selection=materializable,
            raise_on_error=raise_on_error,
            tags={"recsys/trigger": "cli"},
        )
