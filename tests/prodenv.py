"""The environment of a subprocess that loads the code location as production does (``BATIVISION_ENV=prod``).

Production's definitions (kinds, pools, the k8s executor) are fixed when the code location is
imported, so tests that look at them import it in a fresh process. Its required settings get
placeholder values: nothing is called, only built.
"""

from __future__ import annotations

import os

PROD = {"BATIVISION_BQ_PROJECT": "acme-geo", "BATIVISION_BQ_DATASET": "bativision", "BATIVISION_GCS_BUCKET": "acme-bv"}


def prod_env(**extra: str) -> dict[str, str]:
    """This process's environment without its ``BATIVISION_*`` and ``DAGSTER_HOME``, set for production."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATIVISION_") and k != "DAGSTER_HOME"}
    return env | PROD | {"BATIVISION_ENV": "prod"} | extra
