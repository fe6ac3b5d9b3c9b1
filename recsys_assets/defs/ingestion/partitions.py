"""The partitions of the event data: one per range of batches landed in the warehouse.

Dynamic partitions per ingested range rather than daily ones on the event date: the warehouse is
append-only and batches are its unit (the ingest log counts each batch's rows, and conservation is
checked per batch), so a partition is immutable once it has landed. A late event (played days ago,
landed now) belongs to the batch it arrived in, and no closed day has to be extracted again; the
training and the drift report select by ``played_at`` across partitions. The warehouse sensor adds
the partitions (``SensorResult(dynamic_partitions_requests=…)``).
"""

from __future__ import annotations

import dagster as dg
import polars as pl

from recsys_assets.constants import EXTRACT_ROWS_PER_FILE
from recsys_assets.data.store import batch_range_key, parse_batch_range_key, plan_extraction
from recsys_core.warehouse import Warehouse

ingest_batches = dg.DynamicPartitionsDefinition(name="ingest_batches")


def partitioned_up_to(instance: dg.DagsterInstance) -> int:
    """The highest landed batch that a partition holds (0 when there is none): the partitions are the state."""
    keys = instance.get_dynamic_partitions(ingest_batches.name)
    return max((parse_batch_range_key(k)[1] for k in keys), default=0)


def new_batch_ranges(warehouse: Warehouse, after: int) -> list[str]:
    """The partition keys of the batches landed after batch ``after``: consecutive batches grouped into
    ranges of about ``EXTRACT_ROWS_PER_FILE`` rows, which bounds the memory of one partition's run.

    Raises:
        WarehouseError: the warehouse cannot be read.
    """
    warehouse.init_schema()
    landed = warehouse.batches_after(after).filter(pl.col("landed") > 0)
    return [batch_range_key(first, last) for first, last, _ in plan_extraction(landed, EXTRACT_ROWS_PER_FILE)]
