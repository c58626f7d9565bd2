"""ELBv2 service provider for LocalStack (community edition ships none).

Every ELBv2 operation is answered by the moto backend that LocalStack bundles, with these
additions that make it trustworthy for berth's tests (see dataplane.py for the first two):

- DescribeTargetHealth reports the result of real health checks against the registered
  targets (instance targets at the instance's private IP, ip targets at the IP) instead of
  moto's "always healthy".
- A deregistered target drains for the target group's deregistration delay: listed as
  ``draining`` by DescribeTargetHealth, no new connections, existing ones kept
  (dataplane.py).
- Each listener is served: a forwarder bound on the gateway's host address at a port of
  its own relays TCP and/or UDP to a healthy target (TLS listeners terminate TLS with their
  IAM server certificate first). The addresses are listed at
  ``GET /_berth/elbv2/listeners``.
- Listeners behave as on a Network Load Balancer: ModifyListener accepts TCP, UDP, TCP_UDP
  and TLS (moto only takes HTTP, HTTPS and TCP); a TLS listener needs an existing ACM or
  IAM certificate and gets a known SslPolicy (default ELBSecurityPolicy-2016-08); other
  protocols carry neither.
- A load balancer's DNS name is ``<name>-<id>.elb.<region>.amazonaws.com`` with the ID of
  its ARN, as on AWS, so a recreated load balancer has a new name (moto reuses one).
- RunInstances honours a ``_custom_id_`` instance tag (ec2ids.py, a start hook).
- Security groups as AWS has them for NLBs (security.py): CreateLoadBalancer refuses
  unknown groups, SetSecurityGroups refuses to add groups to an NLB created without any
  or to remove all of them, and listeners admit only flows the groups' inbound rules allow.
- Subnet mappings with static addresses (addresses.py): an Elastic IP allocation
  (internet-facing only, existing, not used by another load balancer), a private IPv4
  address (internal only, inside the subnet's CIDR) or an IPv6 address (dualstack only,
  inside the subnet's IPv6 CIDR) is validated as AWS does, kept, and described back in
  ``AvailabilityZones[].LoadBalancerAddresses``.
- Listener extras (listeners.py): ALPN policies on TLS listeners, certificate lists
  (Add/Remove/DescribeListenerCertificates) and listener attributes
  (Describe/ModifyListenerAttributes), validated and described back.
"""

from localstack.aws.api import CommonServiceException
from localstack.aws.skeleton import Skeleton
from localstack.aws.spec import load_service
from localstack.services.moto import call_moto
from localstack.services.plugins import Service, aws_provider

from berth_localstack_ext import addresses, dataplane, listeners, security

NLB_PROTOCOLS = ("TCP", "UDP", "TCP_UDP", "TLS")
DEFAULT_SSL_POLICY = "ELBSecurityPolicy-2016-08"


def _backend(context):
    from moto.elbv2.models import elbv2_backends

    return elbv2_backends[context.account_id][context.region]


def _forward_to_moto(context, _request):
    return call_moto(context)


def _describe_target_health(context, request):
    response = call_moto(context)
    tg_arn = request.get("TargetGroupArn")
    descriptions = response.get("TargetHealthDescriptions", []) or []
    for desc in descriptions:
        target = desc.get("Target") or {}
        health = dataplane.MONITOR.health(tg_arn, target.get("Id"), target.get("Port"))
        if health is not None:
            desc["TargetHealth"] = health
    if not request.get("Targets"):
        listed = {((d.get("Target") or {}).get("Id"), int((d.get("Target") or {}).get("Port") or 0)) for d in descriptions}
        for target_id, port in dataplane.MONITOR.draining(tg_arn):
            if (target_id, port) in listed:
                continue
            descriptions.append(
                {
                    "Target": {"Id": target_id, "Port": port},
                    "HealthCheckPort": str(port),
                    "TargetHealth": {
                        "State": "draining",
                        "Reason": "Target.DeregistrationInProgress",
                        "Description": "Target deregistration is in progress",
                    },
                }
            )
        response["TargetHealthDescriptions"] = descriptions
    return response


def _register_targets(context, request):
    response = call_moto(context)
    tg = _backend(context).target_groups.get(request.get("TargetGroupArn"))
    if tg is not None:
        dataplane.MONITOR.registered(tg.arn, request.get("Targets") or [], tg.port)
    return response


def _deregister_targets(context, request):
    tg = _backend(context).target_groups.get(request.get("TargetGroupArn"))
    response = call_moto(context)
    if tg is not None:
        dataplane.MONITOR.deregistered(tg, request.get("Targets") or [])
    return response


def _create_load_balancer(context, request):
    security.check_create(context, request)
    mappings = addresses.validate(context, request)
    response = call_moto(context)
    backend = _backend(context)
    for desc in response.get("LoadBalancers") or []:
        lb = backend.load_balancers.get(desc.get("LoadBalancerArn"))
        if lb is None:
            continue
        lb.dns_name = f"{lb.name}-{lb.arn.rsplit('/', 1)[-1]}.elb.{context.region}.amazonaws.com"
        desc["DNSName"] = lb.dns_name
        addresses.keep(lb.arn, mappings)
        addresses.describe(desc)
    return response


def _describe_load_balancers(context, _request):
    response = call_moto(context)
    for desc in response.get("LoadBalancers") or []:
        addresses.describe(desc)
    return response


def _delete_load_balancer(context, request):
    response = call_moto(context)
    addresses.forget(request.get("LoadBalancerArn"))
    return response


def _set_subnets(context, request):
    backend = _backend(context)
    arn = request.get("LoadBalancerArn")
    lb = backend.load_balancers.get(arn)
    if lb is None:
        raise CommonServiceException("LoadBalancerNotFound", "One or more load balancers not found")
    full = dict(request, Scheme=lb.scheme, IpAddressType=lb.ip_address_type)
    mappings = addresses.validate(context, full, own=arn)
    response = call_moto(context)
    addresses.keep(arn, mappings)
    for zone in response.get("AvailabilityZones") or []:
        addresses.describe_zone(arn, zone)
    return response


def _ssl_policies():
    from moto.elbv2.responses import SSL_POLICIES

    return {p["name"] for p in SSL_POLICIES}


def _tls_settings(backend, certificates, policy):
    """Validates a TLS listener's certificate and policy as AWS does; returns both."""
    if len(certificates) != 1:
        raise CommonServiceException(
            "CertificateWereNotPassed",
            "You must provide a list containing exactly one certificate if the listener protocol is TLS.",
        )
    if not backend._certificate_exists(certificate_arn=certificates[0]):
        raise CommonServiceException("CertificateNotFound", f"Certificate '{certificates[0]}' not found")
    policy = policy or DEFAULT_SSL_POLICY
    if policy not in _ssl_policies():
        raise CommonServiceException("SSLPolicyNotFound", f"SSL policy '{policy}' not found")
    return certificates, policy


def _create_listener(context, request):
    protocol = (request.get("Protocol") or "").upper()
    if protocol == "TLS":
        certs = [c.get("CertificateArn") for c in request.get("Certificates") or []]
        _tls_settings(_backend(context), certs, request.get("SslPolicy"))
    alpn = listeners.alpn_of(request, protocol)
    response = call_moto(context)
    if protocol != "TLS":
        # moto gives every listener an SslPolicy; on AWS only TLS/HTTPS ones have one.
        backend = _backend(context)
        for desc in response.get("Listeners") or []:
            for lb in backend.load_balancers.values():
                listener = lb.listeners.get(desc.get("ListenerArn"))
                if listener is not None:
                    listener.ssl_policy = None
            desc.pop("SslPolicy", None)
    for desc in response.get("Listeners") or []:
        listeners.set_alpn(desc.get("ListenerArn"), alpn)
        listeners.describe(desc)
    return response


def _describe_listeners(context, _request):
    response = call_moto(context)
    for desc in response.get("Listeners") or []:
        listeners.describe(desc)
    return response


def _add_listener_certificates(context, request):
    backend = _backend(context)
    _find_listener(backend, request["ListenerArn"])
    certs = [c.get("CertificateArn") for c in request.get("Certificates") or []]
    for cert in certs:
        if not backend._certificate_exists(certificate_arn=cert):
            raise CommonServiceException("CertificateNotFound", f"Certificate '{cert}' not found")
    added = listeners.add_certificates(request["ListenerArn"], certs)
    return {"Certificates": [{"CertificateArn": c, "IsDefault": False} for c in added]}


def _remove_listener_certificates(context, request):
    _find_listener(_backend(context), request["ListenerArn"])
    certs = [c.get("CertificateArn") for c in request.get("Certificates") or []]
    listeners.remove_certificates(request["ListenerArn"], certs)
    return {}


def _describe_listener_certificates(context, request):
    _lb, listener = _find_listener(_backend(context), request["ListenerArn"])
    default = [{"CertificateArn": c, "IsDefault": True} for c in list(listener.certificates)[:1]]
    extra = [
        {"CertificateArn": c, "IsDefault": False}
        for c in listeners.certificates(request["ListenerArn"])
    ]
    return {"Certificates": default + extra}


def _describe_listener_attributes(context, request):
    _lb, listener = _find_listener(_backend(context), request["ListenerArn"])
    attrs = listeners.attributes(listener.arn, listener.protocol)
    return {"Attributes": [{"Key": k, "Value": v} for k, v in sorted(attrs.items())]}


def _modify_listener_attributes(context, request):
    _lb, listener = _find_listener(_backend(context), request["ListenerArn"])
    changes = {a.get("Key"): a.get("Value") for a in request.get("Attributes") or []}
    attrs = listeners.modify_attributes(listener.arn, listener.protocol, changes)
    return {"Attributes": [{"Key": k, "Value": v} for k, v in sorted(attrs.items())]}


def _find_listener(backend, arn):
    for lb in backend.load_balancers.values():
        listener = lb.listeners.get(arn)
        if listener is not None:
            return lb, listener
    raise CommonServiceException("ListenerNotFound", "One or more listeners not found")


def _modify_listener(context, request):
    """ModifyListener with a Network Load Balancer's protocols (moto rejects most)."""
    from moto.elbv2.models import FakeAction

    backend = _backend(context)
    lb, listener = _find_listener(backend, request["ListenerArn"])
    protocol = (request.get("Protocol") or listener.protocol).upper()
    if lb.type == "network" and protocol not in NLB_PROTOCOLS:
        raise CommonServiceException(
            "UnsupportedProtocol", f"Protocol {protocol} is not supported by a network load balancer"
        )
    port = request.get("Port")
    if port is not None and any(
        str(other.port) == str(port) and other.arn != listener.arn for other in lb.listeners.values()
    ):
        raise CommonServiceException("DuplicateListener", "A listener with the specified port already exists.")
    if protocol == "TLS":
        certs = [c.get("CertificateArn") for c in request.get("Certificates") or []] or list(listener.certificates)[:1]
        certs, policy = _tls_settings(backend, certs, request.get("SslPolicy") or listener.ssl_policy)
    else:
        certs, policy = [], None
    if "AlpnPolicy" in request or protocol != "TLS":
        listeners.set_alpn(listener.arn, listeners.alpn_of(request, protocol))
    actions = request.get("DefaultActions")
    if actions:
        fake = [FakeAction(dict(a)) for a in actions]
        backend._validate_actions(fake)
        old = {arn for a in listener.default_actions for arn in backend._get_target_group_arns_from(a.data)}
        new = {arn for a in fake for arn in backend._get_target_group_arns_from(a.data)}
        listener.default_actions = fake
        listener._default_rule[0].actions = fake
        for arn in new - old:
            tg = backend.target_groups.get(arn)
            if tg is not None and lb.arn not in tg.load_balancer_arns:
                tg.load_balancer_arns.append(lb.arn)
    if port is not None:
        listener.port = port
    listener.protocol = protocol
    listener.certificates = certs
    listener.certificate = certs[0] if certs else None
    listener.ssl_policy = policy
    out = {
        "ListenerArn": listener.arn,
        "LoadBalancerArn": lb.arn,
        "Port": int(listener.port),
        "Protocol": listener.protocol,
        "DefaultActions": [a.data for a in listener.default_actions],
    }
    if certs:
        out["Certificates"] = [{"CertificateArn": c} for c in certs]
    if policy:
        out["SslPolicy"] = policy
    listeners.describe(out)
    return {"Listeners": [out]}


def _set_security_groups(context, request):
    lb = _backend(context).load_balancers.get(request.get("LoadBalancerArn"))
    if lb is not None:
        security.check_set(lb, request.get("SecurityGroups") or [])
    return call_moto(context)


@aws_provider(api="elbv2")
def elbv2():
    spec = load_service("elbv2")
    dispatch = {name: _forward_to_moto for name in spec.operation_names}
    dispatch["DescribeTargetHealth"] = _describe_target_health
    dispatch["RegisterTargets"] = _register_targets
    dispatch["DeregisterTargets"] = _deregister_targets
    dispatch["CreateLoadBalancer"] = _create_load_balancer
    dispatch["DescribeLoadBalancers"] = _describe_load_balancers
    dispatch["DeleteLoadBalancer"] = _delete_load_balancer
    dispatch["SetSubnets"] = _set_subnets
    dispatch["CreateListener"] = _create_listener
    dispatch["DescribeListeners"] = _describe_listeners
    dispatch["ModifyListener"] = _modify_listener
    dispatch["SetSecurityGroups"] = _set_security_groups
    dispatch["AddListenerCertificates"] = _add_listener_certificates
    dispatch["RemoveListenerCertificates"] = _remove_listener_certificates
    dispatch["DescribeListenerCertificates"] = _describe_listener_certificates
    dispatch["DescribeListenerAttributes"] = _describe_listener_attributes
    dispatch["ModifyListenerAttributes"] = _modify_listener_attributes
    dataplane.start()
    return Service("elbv2", skeleton=Skeleton(spec, dispatch))
