"""The BentoML recommendation service. Imports nothing from Dagster."""
