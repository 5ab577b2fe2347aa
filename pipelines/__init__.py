"""Dagster definitions for k2batch: batches as partitions, an inputs sensor, a nightly schedule, the UI."""
