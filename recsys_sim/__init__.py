"""The embedded default's data source: a seeded simulator of listening behaviour (``simulator``), its
world on disk and in the warehouse (``simulation``), and simulated traffic against the live service
(``traffic``). Plain Python: neither Dagster nor TensorFlow."""
