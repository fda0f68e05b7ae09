"""Software-defined assets: one module per asset (or asset family).

They hold the Dagster glue only — config, partition keys, logging, metadata —
and call framework-free compute in ``ops`` and external systems through
``resources``.
"""
