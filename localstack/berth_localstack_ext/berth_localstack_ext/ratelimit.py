"""AWS's request rate limits for ELBv2 and EC2, enforced as AWS does: token buckets per
account and Region, a request without a token answered with AWS's throttling error
(ELBv2: HTTP 400 ``Throttling`` "Rate exceeded"; EC2: HTTP 503 ``RequestLimitExceeded``).

Off until switched on, so the suites that do not test limits never wait on them (they
share one LocalStack and one account): ``BERTH_AWS_LIMITS=1`` in LocalStack's environment,
or ``POST /_berth/ratelimit`` with ``{"enabled": true}``. The same endpoint answers, on
GET, the table in force and how many requests each bucket refused since it was switched
on. A POST may carry ``"scale"``, a factor on every bucket's size and refill rate (a test
that must see throttling after a few calls uses a small one); buckets start full on
every POST.
"""

import fnmatch
import json
import os
import threading
import time
from dataclasses import dataclass

from localstack.runtime import hooks

ELBV2_PAGE = "https://docs.aws.amazon.com/elasticloadbalancing/latest/userguide/elb-api-throttling.html"
EC2_PAGE = "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"


@dataclass(frozen=True)
class Rate:
    service: str
    #: Space-separated operation names or shell patterns; the first matching row counts.
    operations: str
    burst: float
    per_second: float
    #: One bucket for every operation of the row, or one per operation.
    shared: bool
    source: str


# The one table. Each row cites where its numbers come from; where the page's text we
# could read gives no number for an operation, the row says so and takes a conservative
# value (no larger than the published ones next to it).
RATES = (
    # ELBv2 page, "Request rate limiting": non-mutating actions have a bucket of 40 tokens
    # refilled at 10 per second (its Describe* example). Shared by every Describe*: the
    # page speaks of one bucket for them, the stricter reading.
    Rate("elbv2", "Describe*", 40, 10, True, ELBV2_PAGE + " (published: non-mutating actions)"),
    # ELBv2 page, section "bucket capacity and refill rate", as the AWS Load Balancer
    # Controller's default client-side throttle cites it (RegisterTargets|DeregisterTargets
    # 20 tokens, 4/s; Modify* 20 tokens, 3/s). One bucket each, as that controller uses.
    Rate("elbv2", "RegisterTargets DeregisterTargets", 20, 4, True, ELBV2_PAGE + " (registration actions)"),
    Rate("elbv2", "Modify*", 20, 3, True, ELBV2_PAGE + " (Modify* actions)"),
    # Create*, Delete*, Set*, AddTags, RemoveTags: no number in the text we could read.
    # Conservative: as the Modify* row, one bucket per operation.
    Rate("elbv2", "*", 20, 3, False, ELBV2_PAGE + " (not published there: conservative, as Modify*)"),
    # EC2 page, "Request rate limiting": each API is evaluated individually; a
    # non-mutating action (its DescribeHosts example) has 100 tokens refilled at 20/s.
    Rate("ec2", "Describe*", 100, 20, False, EC2_PAGE + " (published: non-mutating, per API)"),
    # Mutating EC2 actions (the environment's RunInstances, CreateSubnet...): no number in
    # the text we could read. Conservative: a quarter of the non-mutating rate.
    Rate("ec2", "*", 50, 5, False, EC2_PAGE + " (not published there: conservative)"),
)

ERRORS = {
    "elbv2": ("Throttling", "Rate exceeded", 400),
    "ec2": ("RequestLimitExceeded", "Request limit exceeded.", 503),
}


def rate_of(service, operation):
    """The first row of RATES for the operation, or None for a service without limits."""
    for rate in RATES:
        if rate.service == service and any(fnmatch.fnmatchcase(operation, p) for p in rate.operations.split()):
            return rate
    return None


class Buckets:
    """Token buckets by (account, region, service, bucket), created full on first use."""

    def __init__(self, enabled=False, scale=1.0, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.enabled = enabled
        self.scale = scale
        self._tokens = {}  # key -> (tokens, at)
        self.refused = {}  # "service:bucket" -> count

    def configure(self, enabled, scale=1.0):
        with self._lock:
            self.enabled = bool(enabled)
            self.scale = float(scale)
            self._tokens.clear()
            self.refused.clear()

    def take(self, account, region, service, operation):
        """Takes a token for one request; False when the request is throttled."""
        rate = rate_of(service, operation)
        if rate is None:
            return True
        bucket = rate.operations if rate.shared else operation
        key = (account, region, service, bucket)
        with self._lock:
            if not self.enabled:
                return True
            burst = max(1.0, rate.burst * self.scale)
            per_second = rate.per_second * self.scale
            now = self._clock()
            tokens, at = self._tokens.get(key, (burst, now))
            tokens = min(burst, tokens + (now - at) * per_second)
            if tokens >= 1.0:
                self._tokens[key] = (tokens - 1.0, now)
                return True
            self._tokens[key] = (tokens, now)
            label = f"{service}:{bucket}"
            self.refused[label] = self.refused.get(label, 0) + 1
            return False

    def describe(self):
        with self._lock:
            return {
                "enabled": self.enabled,
                "scale": self.scale,
                "refused": dict(self.refused),
                "rates": [
                    {
                        "service": r.service,
                        "operations": r.operations,
                        "burst": r.burst,
                        "perSecond": r.per_second,
                        "shared": r.shared,
                        "source": r.source,
                    }
                    for r in RATES
                ],
            }


BUCKETS = Buckets(enabled=os.environ.get("BERTH_AWS_LIMITS", "") in ("1", "true"))


def _handler(_chain, context, _response):
    """A request handler of LocalStack's chain, after the request is parsed."""
    service = getattr(context.service, "service_name", None) if context.service else None
    if service not in ERRORS or context.operation is None:
        return
    if BUCKETS.take(context.account_id, context.region, service, context.operation.name):
        return
    from localstack.aws.api import CommonServiceException

    code, message, status = ERRORS[service]
    raise CommonServiceException(code, message, status_code=status, sender_fault=True)


def _endpoint(request, **_kwargs):
    from localstack.http import Response

    if request.method == "POST":
        try:
            body = json.loads(request.get_data() or b"{}")
            BUCKETS.configure(body.get("enabled", True), body.get("scale", 1.0))
        except (ValueError, TypeError, AttributeError) as e:
            return Response(json.dumps({"error": f"bad request: {e}"}), status=400, mimetype="application/json")
    return Response(json.dumps(BUCKETS.describe()), status=200, mimetype="application/json")


_installed = False


def install():
    """Adds the handler to LocalStack's chain and the endpoint to its router, once."""
    global _installed
    if _installed:
        return
    _installed = True
    from localstack.aws import handlers
    from localstack.services.edge import ROUTER

    handlers.serve_custom_service_request_handlers.append(_handler)
    ROUTER.add(path="/_berth/ratelimit", endpoint=_endpoint, methods=["GET", "POST"])


@hooks.on_infra_start()
def berth_rate_limits():
    """Installed at start: the limits cover EC2 too, whose provider is not berth's."""
    install()
