"""Dagster wiring: Definitions, partitions, jobs, schedules, executors and the environment switch."""
