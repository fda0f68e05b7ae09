"""The crop: one chip per building, cut from the mosaic into shards (the ``chips`` step).

Read in this order: ``spec`` (chip windows), ``units`` (cells and parts),
``tiles`` (the block cache), ``cut`` (one unit's chips and index), ``writer``
and ``npystream`` (streaming shards to disk), ``lanes`` (which worker cuts
what), ``prefetch`` (remote blocks made local ahead of the cut) and
``partition`` (the whole partition, with workers and resumption). What it
writes follows ``ops.shards``.
"""
