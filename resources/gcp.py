"""Credentials for Google Cloud clients, the same way for BigQuery and Cloud Storage.

Production uses application default credentials (workload identity on GKE,
``gcloud auth application-default login`` on a workstation): nothing secret is
ever configured in the repository. An endpoint given as plain ``http://`` can
only be a local emulator (Google's APIs are HTTPS only); such an endpoint gets
anonymous credentials, so that no token is ever sent in clear and tests need
no Google account.
"""

from __future__ import annotations

import google.auth
from google.auth.credentials import AnonymousCredentials, Credentials


def is_emulator(api_endpoint: str | None) -> bool:
    return bool(api_endpoint) and api_endpoint.startswith("http://")


def credentials_for(api_endpoint: str | None, scopes: list[str] | None = None) -> Credentials:
    """Anonymous credentials for an emulator, application default credentials otherwise."""
    if is_emulator(api_endpoint):
        return AnonymousCredentials()
    creds, _ = google.auth.default(scopes=scopes)
    return creds


def client_options(api_endpoint: str | None) -> dict:
    return {"api_endpoint": api_endpoint} if api_endpoint else {}
