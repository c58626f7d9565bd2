"""ELBv2 service provider for LocalStack (community edition ships none).

Every ELBv2 operation is answered by the moto backend that LocalStack bundles.
"""

from localstack.aws.skeleton import Skeleton
from localstack.aws.spec import load_service
from localstack.services.moto import call_moto
from localstack.services.plugins import Service, aws_provider


def _forward_to_moto(context, _request):
    return call_moto(context)


@aws_provider(api="elbv2")
def elbv2():
    spec = load_service("elbv2")
    dispatch = {name: _forward_to_moto for name in spec.operation_names}
    return Service("elbv2", skeleton=Skeleton(spec, dispatch))
