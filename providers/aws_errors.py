"""EC2 error codes -> the ftplan error tree, with the advice each refusal needs.

Codes: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html (see providers/aws.py for
which behaviour each class triggers).
"""

from __future__ import annotations

from ftplan.providers.errors import (
    AuthError,
    BillingError,
    CapacityError,
    InstanceGone,
    OfferUnavailable,
    ProviderError,
    QuotaError,
)

CAPACITY_CODES = {
    "InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity",
    "SpotMaxPriceTooLow", "InsufficientReservedInstanceCapacity",
}
NOT_OFFERED_CODES = {"InvalidInstanceType", "Unsupported"}  # "not sold here": next offer, no retry
QUOTA_CODES = {"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"}
AUTH_CODES = {
    "AuthFailure", "UnauthorizedOperation", "ExpiredToken", "RequestExpired",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException", "InvalidAccessKeyId",
}
BILLING_CODES = {"OptInRequired", "PendingVerification", "Blocked"}
GONE_CODES = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
# Codes EC2 answers for a resource it created a moment ago but has not propagated (see module docstring).
NOT_VISIBLE_YET = {"InvalidInstanceID.NotFound", "InvalidGroup.NotFound", "InvalidKeyPair.NotFound",
                   "InvalidPlacementGroup.Unknown"}
BILLING_PAGE = "https://console.aws.amazon.com/billing/home#/paymentmethods"
NO_CREDENTIALS = (
    "AWS credentials not found: run `aws configure` or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
)


def mapped(exc: BaseException, doing: str) -> BaseException:
    """SDK exception -> ftplan.providers.errors class (message scrubbed); anything else passes through."""
    if isinstance(exc, ProviderError) or not isinstance(exc, Exception):
        return exc
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 missing means _ec2 already raised
        return exc
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.ProfileNotFound)):
        return AuthError(NO_CREDENTIALS, provider="aws")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code, message = err.get("Code", "Unknown"), err.get("Message", "")
        text = f"AWS {code} while {doing}: {message}"
        if code in CAPACITY_CODES:
            return CapacityError(text, provider="aws")
        if code in NOT_OFFERED_CODES:
            return OfferUnavailable(f"{text}; this type is not offered there, trying the next offer", provider="aws")
        if code in QUOTA_CODES:
            quota = ("'All Standard/G and VT/P Spot Instance Requests'" if code == "MaxSpotInstanceCountExceeded"
                     else "the EC2 vCPU quota for this instance family (e.g. 'Running On-Demand P instances')")
            return QuotaError(f"{text}; raise {quota} in the Service Quotas console "
                              "(https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas)", provider="aws")
        if code in BILLING_CODES:
            return BillingError(f"{text}; the account cannot launch instances until billing/verification is "
                                f"complete: {BILLING_PAGE}", provider="aws")
        if code in AUTH_CODES:
            hint = ("grant the missing ec2 permission to this IAM identity" if code == "UnauthorizedOperation"
                    else "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (`aws sts get-caller-identity`)")
            return AuthError(f"{text}; {hint}", provider="aws")
        if code in GONE_CODES:
            return InstanceGone(text, provider="aws")
        return ProviderError(text, provider="aws")
    if isinstance(exc, bx.BotoCoreError):
        return ProviderError(f"AWS request failed while {doing}: {exc}", provider="aws")
    return exc
