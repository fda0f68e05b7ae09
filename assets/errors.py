"""Retries for flaky I/O only; bad input and internal errors fail once, saying so.

Reading imagery, writing shards and the warehouse can fail transiently
(a locked file, a network blip on object storage, a pod preempted on a spot
node): those steps retry with backoff. Everything else fails the same way
every time, so retrying it only delays the message by half a minute:

- bad input — a duplicate id, an unknown CRS, a missing folder, a model that
  doesn't fit the chips — and a partition another run is writing are raised as a non-retryable Dagster ``Failure``
  carrying the message that names the culprit;
- any other exception (a bug, or an input case nobody foresaw) is also raised
  as a non-retryable ``Failure``, naming the partition and the exception, with
  the original traceback kept as its cause.

Transient: ``OSError`` (files, sockets, GDAL's I/O errors), DuckDB's I/O and
lock errors, Cloud APIs' server-side and rate-limit errors.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
from dagster import Backoff, Failure, RetryPolicy, RetryRequested
from google.api_core import exceptions as google_errors

from ops.geo.crs import UnrecognisedCRSError
from ops.geo.departements import UnknownDepartementError
from ops.geo.footprints import FootprintError
from ops.imagery.mosaic import MosaicError
from ops.imagery.wms import WmsError
from ops.locks import PartitionBusyError
from ops.ml.card import ModelMismatchError
from resources.imagery import MissingInputError
from resources.model_store import ModelNotFoundError

IO_RETRY = RetryPolicy(max_retries=2, delay=5, backoff=Backoff.EXPONENTIAL)

INPUT_ERRORS = (
    FootprintError,
    MosaicError,
    UnrecognisedCRSError,
    UnknownDepartementError,
    MissingInputError,
    ModelMismatchError,
    ModelNotFoundError,
    PartitionBusyError,
    WmsError,
)

TRANSIENT_ERRORS = (
    OSError,
    duckdb.IOException,
    google_errors.ServerError,
    google_errors.TooManyRequests,
    google_errors.RetryError,
)


@contextmanager
def bad_input_fails_fast(partition: str | None = None) -> Iterator[None]:
    """Let transient I/O errors through (the step's retry policy retries them); fail once on anything else."""
    where = f"partition {partition}: " if partition else ""
    try:
        yield
    except INPUT_ERRORS as exc:
        raise Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
    except (Failure, RetryRequested, *TRANSIENT_ERRORS):
        raise
    except Exception as exc:
        raise Failure(
            description=f"{where}{type(exc).__module__}.{type(exc).__name__}: {exc} "
            "(not an I/O error: not retried; the traceback is in the cause below)",
            allow_retries=False,
        ) from exc
