"""Static addresses of Network Load Balancer subnet mappings, which moto accepts and drops.

A mapping may carry an Elastic IP allocation (internet-facing load balancers), a private
IPv4 address (internal ones) or an IPv6 address (dualstack ones). Each is validated as AWS
does before the load balancer is made, kept per load balancer, and described back in
``AvailabilityZones[].LoadBalancerAddresses``.
"""

import ipaddress
import threading

from localstack.aws.api import CommonServiceException

_LOCK = threading.Lock()
# load balancer ARN -> subnet ID -> {"AllocationId"?, "PrivateIPv4Address"?, "IPv6Address"?}
_ADDRESSES = {}


def _invalid(message):
    return CommonServiceException("InvalidConfigurationRequest", message)


def _ec2(context):
    from moto.ec2.models import ec2_backends

    return ec2_backends[context.account_id][context.region]


def _subnet_networks(subnet, version):
    if version == 4:
        return [ipaddress.ip_network(subnet.cidr_block)]
    assocs = getattr(subnet, "ipv6_cidr_block_associations", {}) or {}
    blocks = [a.get("ipv6CidrBlock") for a in assocs.values()]
    return [ipaddress.ip_network(b) for b in blocks if b]


def _eip(ec2, allocation_id):
    for address in getattr(ec2, "addresses", []):
        if getattr(address, "allocation_id", None) == allocation_id:
            return address
    return None


def _in_use_elsewhere(allocation_id, own):
    with _LOCK:
        return any(
            m.get("AllocationId") == allocation_id
            for arn, subnets in _ADDRESSES.items()
            if arn != own
            for m in subnets.values()
        )


def validate(context, request, own=None):
    """The static addresses of the request's ``SubnetMappings`` by subnet, or the error AWS
    gives. ``own``: the load balancer being changed (its own addresses are not "in use")."""
    mappings = request.get("SubnetMappings") or []
    scheme = request.get("Scheme") or "internet-facing"
    ip_type = request.get("IpAddressType") or "ipv4"
    ec2 = _ec2(context)
    out = {}
    for m in mappings:
        subnet_id = m.get("SubnetId")
        subnet = ec2.get_subnet(subnet_id) if subnet_id else None
        if subnet is None:
            raise CommonServiceException("SubnetNotFound", f"The subnet ID '{subnet_id}' is not valid")
        kept = {}
        allocation = m.get("AllocationId")
        if allocation:
            if scheme != "internet-facing":
                raise _invalid("Elastic IP addresses can only be used with internet-facing load balancers")
            eip = _eip(ec2, allocation)
            if eip is None:
                raise CommonServiceException("AllocationIdNotFound", f"Elastic IP '{allocation}' not found")
            if getattr(eip, "association_id", None) or _in_use_elsewhere(allocation, own):
                raise _invalid(f"Elastic IP '{allocation}' is already associated")
            kept["AllocationId"] = allocation
            kept["IpAddress"] = eip.public_ip
        for key, version, needs in (
            ("PrivateIPv4Address", 4, "internal"),
            ("IPv6Address", 6, "dualstack"),
        ):
            value = m.get(key)
            if not value:
                continue
            if version == 4 and scheme != "internal":
                raise _invalid("A private IPv4 address can only be given for an internal load balancer")
            if version == 6 and ip_type != "dualstack":
                raise _invalid("An IPv6 address can only be given for a dualstack load balancer")
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                raise _invalid(f"'{value}' is not a valid IP address") from None
            if address.version != version or not any(
                address in net for net in _subnet_networks(subnet, version)
            ):
                raise _invalid(f"The address '{value}' is not in the CIDR of subnet '{subnet_id}'")
            kept[key] = value
        out[subnet_id] = kept
    return out


def keep(arn, mappings):
    """Records the addresses of the load balancer's new subnet mappings."""
    if not mappings:
        return
    with _LOCK:
        _ADDRESSES.setdefault(arn, {}).update(mappings)


def forget(arn):
    with _LOCK:
        _ADDRESSES.pop(arn, None)


def describe_zone(arn, zone):
    with _LOCK:
        kept = dict((_ADDRESSES.get(arn) or {}).get(zone.get("SubnetId")) or {})
    if kept:
        zone["LoadBalancerAddresses"] = [kept]


def describe(desc):
    """Adds the kept addresses to a described load balancer."""
    for zone in desc.get("AvailabilityZones") or []:
        describe_zone(desc.get("LoadBalancerArn"), zone)
