"""Retries for flaky I/O, none for bad input.

Reading imagery, writing shards and the warehouse can fail transiently
(a locked file, a network blip on object storage): those steps retry with
backoff. Bad input — a duplicate id, an unknown CRS, a missing folder, a model
that doesn't fit the chips — fails the same way every time, so it is raised
as a non-retryable Dagster ``Failure`` carrying the message that names the
culprit.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import Backoff, Failure, RetryPolicy

from ops.geo.crs import UnrecognisedCRSError
from ops.geo.departements import UnknownDepartementError
from ops.geo.footprints import FootprintError
from ops.imagery.mosaic import MosaicError
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
)


@contextmanager
def bad_input_fails_fast() -> Iterator[None]:
    """Turn the project's input errors into a Failure that Dagster will not retry."""
    try:
        yield
    except INPUT_ERRORS as exc:
        raise Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
