"""What moto keeps for Network Load Balancer listeners only partly or not at all: the ALPN
policy of a TLS listener, its certificate list besides the default certificate, and
listener attributes. Each is validated as AWS does, kept per listener ARN, and described
back.
"""

import threading

from localstack.aws.api import CommonServiceException

ALPN_POLICIES = ("HTTP1Only", "HTTP2Only", "HTTP2Optional", "HTTP2Preferred", "None")
# Network Load Balancer listener attributes: key -> (default, lowest, highest, protocols).
ATTRIBUTES = {"tcp.idle_timeout.seconds": ("350", 60, 6000, ("TCP", "TLS"))}

_LOCK = threading.Lock()
_ALPN = {}
_CERTIFICATES = {}
_ATTRIBUTES = {}


def alpn_of(request, protocol):
    """The request's ALPN policy (one name), or None; only TLS listeners take one."""
    policy = request.get("AlpnPolicy") or []
    if not policy:
        return None
    if len(policy) != 1 or policy[0] not in ALPN_POLICIES:
        raise CommonServiceException("ALPNPolicyNotSupported", f"ALPN policy {policy} is not supported")
    if protocol != "TLS":
        raise CommonServiceException(
            "ValidationError", "An ALPN policy can only be set on a TLS listener"
        )
    return policy[0]


def set_alpn(arn, policy):
    with _LOCK:
        if policy:
            _ALPN[arn] = policy
        else:
            _ALPN.pop(arn, None)


def describe(desc):
    with _LOCK:
        policy = _ALPN.get(desc.get("ListenerArn"))
    if policy:
        desc["AlpnPolicy"] = [policy]
    else:
        desc.pop("AlpnPolicy", None)


def add_certificates(arn, certs):
    with _LOCK:
        have = _CERTIFICATES.setdefault(arn, [])
        for c in certs:
            if c not in have:
                have.append(c)
        if len(have) > 25:
            raise CommonServiceException("TooManyCertificates", "A listener takes at most 25 certificates")
        return list(have)


def remove_certificates(arn, certs):
    with _LOCK:
        _CERTIFICATES[arn] = [c for c in _CERTIFICATES.get(arn, []) if c not in certs]


def certificates(arn):
    with _LOCK:
        return list(_CERTIFICATES.get(arn, []))


def attributes(arn, protocol):
    """The listener's attributes: AWS's defaults for its protocol, then what was set."""
    base = {k: d for k, (d, _lo, _hi, protos) in ATTRIBUTES.items() if protocol in protos}
    with _LOCK:
        base.update(_ATTRIBUTES.get(arn, {}))
    return base


def modify_attributes(arn, protocol, changes):
    for key, value in changes.items():
        spec = ATTRIBUTES.get(key)
        if spec is None or protocol not in spec[3]:
            raise CommonServiceException(
                "ValidationError", f"Attribute '{key}' is not supported on a {protocol} listener"
            )
        _default, low, high, _protos = spec
        if not (str(value).isdigit() and low <= int(value) <= high):
            raise CommonServiceException(
                "ValidationError", f"'{value}' is not a valid value for '{key}' ({low}-{high})"
            )
    with _LOCK:
        _ATTRIBUTES.setdefault(arn, {}).update({k: str(v) for k, v in changes.items()})
    return attributes(arn, protocol)
