"""The models: networks, cards and versions, training, batched inference, outputs → prediction rows.

Serves the training assets (one per declared attribute, ``models/attributes.yaml``) and ``predictions``.
Reads chips only through ``ops.shards``.
"""
