"""Provider adapters: one module per provider behind the small interface in `providers.base`.

SDKs (boto3, google-cloud-compute, runpod) are imported lazily inside each adapter, so that
importing `providers` costs nothing and a missing extra becomes a one-line hint.
"""

from ftplan.providers.base import (
    Instance,
    InstanceRequest,
    InstanceState,
    Provider,
    SSHEndpoint,
    get_provider,
)
from ftplan.providers.errors import AuthError, CapacityError, ProviderError, QuotaError

__all__ = [
    "AuthError", "CapacityError", "Instance", "InstanceRequest", "InstanceState", "Provider",
    "ProviderError", "QuotaError", "SSHEndpoint", "get_provider",
]
