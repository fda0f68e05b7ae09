"""Framework-free compute for bativision, one sub-package per domain (see docs/ARCHITECTURE.md).

``geo`` (where buildings are), ``imagery`` (tiles to pixels), ``crop`` (one
chip per building), ``ml`` (models, training, inference), and ``shards``, the
chip format that ``crop`` writes and ``ml`` reads. Nothing in this package
imports Dagster, so every step can be imported, tested and benchmarked on its
own, and run in any worker (a Dagster step, a k8s pod, a notebook).
"""
