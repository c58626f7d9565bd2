"""ELBv2 service provider for LocalStack (community edition ships none).

Every ELBv2 operation is answered by the moto backend that LocalStack bundles, with two
additions that make it trustworthy for berth's tests (see dataplane.py):

- DescribeTargetHealth reports the result of real health checks against the registered
  targets (instance targets at the instance's private IP, ip targets at the IP) instead of
  moto's "always healthy".
- Each listener is served: a forwarder bound on the gateway's host address at a port of
  its own relays TCP and/or UDP to a healthy target. The addresses are listed at
  ``GET /_berth/elbv2/listeners``.
"""

from localstack.aws.skeleton import Skeleton
from localstack.aws.spec import load_service
from localstack.services.moto import call_moto
from localstack.services.plugins import Service, aws_provider

from berth_localstack_ext import dataplane


def _forward_to_moto(context, _request):
    return call_moto(context)


def _describe_target_health(context, request):
    response = call_moto(context)
    tg_arn = request.get("TargetGroupArn")
    for desc in response.get("TargetHealthDescriptions", []) or []:
        target = desc.get("Target") or {}
        health = dataplane.MONITOR.health(tg_arn, target.get("Id"), target.get("Port"))
        if health is not None:
            desc["TargetHealth"] = health
    return response


@aws_provider(api="elbv2")
def elbv2():
    spec = load_service("elbv2")
    dispatch = {name: _forward_to_moto for name in spec.operation_names}
    dispatch["DescribeTargetHealth"] = _describe_target_health
    dataplane.start()
    return Service("elbv2", skeleton=Skeleton(spec, dispatch))
