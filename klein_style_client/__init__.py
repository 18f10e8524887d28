"""A small typed client of the Klein Style HTTP API (httpx + pydantic; no torch, no Ray).

    from klein_style_client import Client, AsyncClient, ApiError

The request and response models (`klein_style_client.models`) are the ones the service builds its OpenAPI
document from.
"""

from klein_style_client import models
from klein_style_client.client import (
    RETRY_STATUSES, ApiError, AsyncClient, Client, KleinStyleError, TransportError, retry_after_s,
)

__all__ = ["Client", "AsyncClient", "ApiError", "KleinStyleError", "TransportError", "RETRY_STATUSES",
           "retry_after_s", "models"]
