"""Framework-free compute for bativision: reading footprints, building mosaics,
cropping chips, training and running models.

Nothing in this package imports Dagster, so every step can be imported, tested
and benchmarked on its own, and run in any worker (a Dagster step, a k8s pod,
a notebook).
"""
