"""The models: networks, cards and versions, training, batched inference, outputs → prediction rows.

Serves the training assets (``roof_model``, ``solar_model``) and ``predictions``.
Reads chips only through ``ops.shards``.
"""
