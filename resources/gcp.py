"""Credentials for Google Cloud clients, the same way for BigQuery and Cloud Storage.

Production uses application default credentials (workload identity on GKE,
``gcloud auth application-default login`` on a workstation): nothing secret is
ever configured in the repository. dagster-gcp's ``BigQueryResource`` may
instead carry ``gcp_credentials``, a base64-encoded service-account key (its
own convention), for a deployment without workload identity. An endpoint given
as plain ``http://`` can only be a local emulator (Google's APIs are HTTPS
only); such an endpoint gets anonymous credentials, so that no token is ever
sent in clear and tests need no Google account.
"""

from __future__ import annotations

import base64
import binascii
import json

import google.auth
from google.auth.credentials import AnonymousCredentials, Credentials
from google.oauth2 import service_account


def is_emulator(api_endpoint: str | None) -> bool:
    return bool(api_endpoint) and api_endpoint.startswith("http://")


def credentials_for(
    api_endpoint: str | None, scopes: list[str] | None = None, key_base64: str | None = None
) -> Credentials:
    """Anonymous for an emulator; else the service-account key ``key_base64`` if given; else application default."""
    if is_emulator(api_endpoint):
        return AnonymousCredentials()
    if key_base64:
        try:
            info = json.loads(base64.b64decode(key_base64, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"gcp_credentials is not a base64-encoded service-account JSON key ({exc})") from exc
        return service_account.Credentials.from_service_account_info(info, scopes=scopes)
    creds, _ = google.auth.default(scopes=scopes)
    return creds


def client_options(api_endpoint: str | None) -> dict:
    return {"api_endpoint": api_endpoint} if api_endpoint else {}
