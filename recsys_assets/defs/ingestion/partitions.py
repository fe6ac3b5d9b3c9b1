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

ingest_batches = dg.DynamicPartitionsDefinition(name="ingest_batches")
