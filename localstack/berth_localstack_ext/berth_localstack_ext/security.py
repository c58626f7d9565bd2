"""An NLB's security groups on the emulated data path, and the ELBv2 rules about them.

AWS evaluates the inbound rules of an NLB's security groups for every new flow to a
listener: a flow is admitted when one rule of one group matches its protocol, the
listener port and its source (a CIDR, a managed prefix list's entries, or another group
whose members the source is). An NLB without security groups admits everything.

The emulation sees a flow only after the kernel accepted it, so a refused TCP connection
is reset (AWS drops it silently, and the client times out); a refused UDP datagram is
dropped, as on AWS.

moto models none of this, nor two ELBv2 rules that make an NLB's groups a decision
taken at creation: groups can be set on an NLB only if it was created with some, and an
NLB created with groups keeps at least one (``set_security_groups``).

The account's inbound-rules-per-group quota is ``BERTH_SG_RULES_QUOTA`` (default 1000,
the most AWS grants on request; moto has the default 60): one backend rule per Service
and port on the nodes' group, as berth and the AWS Load Balancer Controller make them,
fills 60 with a few dozen Services.
"""

import ipaddress
import logging
import os

from localstack.aws.api import CommonServiceException
from localstack.runtime import hooks

LOG = logging.getLogger("localstack.berth.security")


def _ec2(account, region):
    from moto.ec2.models import ec2_backends

    try:
        return ec2_backends[account][region]
    except Exception:  # noqa: BLE001 - no EC2 state there: no group can match
        return None


def _rules(group):
    """(protocol, from, to, cidrs, prefix lists, groups) of each inbound rule.

    moto keeps one object per rule (``ip_range``, ``source_group``, ``prefix_list_id``)
    since 5.1.3; older ones grouped them (``ip_ranges``, ``source_groups``,
    ``prefix_list_ids``): both are read."""
    for rule in getattr(group, "ingress_rules", None) or []:
        protocol = str(getattr(rule, "ip_protocol", None) or "-1").lower()
        protocol = {"6": "tcp", "17": "udp", "all": "-1"}.get(protocol, protocol)
        ranges = list(getattr(rule, "ip_ranges", None) or [])
        one = getattr(rule, "ip_range", None)
        if one:
            ranges.append(one)
        cidrs = [r.get("CidrIp") or r.get("CidrIpv6") for r in ranges if isinstance(r, dict)]
        lists = [p.get("PrefixListId") for p in getattr(rule, "prefix_list_ids", None) or [] if isinstance(p, dict)]
        if isinstance(getattr(rule, "prefix_list_id", None), str):
            lists.append(rule.prefix_list_id)
        groups = [g.get("GroupId") for g in getattr(rule, "source_groups", None) or [] if isinstance(g, dict)]
        one = getattr(rule, "source_group", None)
        if isinstance(one, dict) and one.get("GroupId"):
            groups.append(one["GroupId"])
        yield protocol, getattr(rule, "from_port", None), getattr(rule, "to_port", None), cidrs, lists, groups


def _in_cidr(address, cidr):
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def _in_prefix_list(ec2, address, list_id):
    pl = getattr(ec2, "managed_prefix_lists", {}).get(list_id)
    if pl is None or not pl.entries:
        return False
    latest = pl.entries[max(pl.entries)]
    return any(_in_cidr(address, e.get("Cidr", "")) for e in latest or [])


def _member_of(ec2, address, group_id):
    """Whether an instance with this private address is in the group."""
    for inst in ec2.all_instances():
        if getattr(inst, "private_ip", None) != address:
            continue
        ids = {getattr(g, "id", g) for g in getattr(inst, "security_groups", None) or []}
        if group_id in ids:
            return True
    return False


def admits(lb, protocol, port, address):
    """Whether the NLB ``lb`` admits a ``protocol`` (tcp/udp) flow from ``address`` to
    its listener ``port``."""
    group_ids = list(getattr(lb, "security_groups", None) or [])
    if not group_ids:
        return True
    account, region = lb.arn.split(":")[4], lb.arn.split(":")[3]
    ec2 = _ec2(account, region)
    if ec2 is None:
        return False
    port = int(port)
    for group_id in group_ids:
        group = ec2.get_security_group_from_id(group_id)
        if group is None:
            continue
        for rule_protocol, lo, hi, cidrs, lists, groups in _rules(group):
            if rule_protocol not in ("-1", protocol):
                continue
            if rule_protocol != "-1" and lo is not None and hi is not None and not int(lo) <= port <= int(hi):
                continue
            if any(_in_cidr(address, c) for c in cidrs if c):
                return True
            if any(_in_prefix_list(ec2, address, p) for p in lists if p):
                return True
            if any(_member_of(ec2, address, g) for g in groups if g):
                return True
    return False


def check_create(context, request):
    """CreateLoadBalancer: every named security group must exist (moto takes any ID)."""
    groups = request.get("SecurityGroups") or []
    if not groups:
        return
    ec2 = _ec2(context.account_id, context.region)
    for group_id in groups:
        if ec2 is None or ec2.get_security_group_from_id(group_id) is None:
            raise CommonServiceException("InvalidSecurityGroup", f"Security group '{group_id}' does not exist")


def check_set(lb, groups):
    """SetSecurityGroups on a Network Load Balancer, as AWS answers it."""
    if getattr(lb, "type", None) != "network":
        return
    if not getattr(lb, "security_groups", None):
        raise CommonServiceException(
            "InvalidConfigurationRequest",
            "You cannot set security groups on a Network Load Balancer which was created without any security groups.",
        )
    if not groups:
        raise CommonServiceException(
            "InvalidConfigurationRequest",
            "You cannot remove all security groups from a Network Load Balancer which was created with security groups.",
        )


def install_rules_quota():
    """Replaces moto's fixed 60 rules per VPC group by the quota (once per process)."""
    from moto.ec2.exceptions import RulesPerSecurityGroupLimitExceededError
    from moto.ec2.models.security_groups import SecurityGroupBackend

    if getattr(SecurityGroupBackend, "_berth_quota", False):
        return
    quota = int(os.environ.get("BERTH_SG_RULES_QUOTA", "1000"))

    def verify(self, group, current_rule_nb, ip_ranges, source_groups=None, egress=False):
        wanted = current_rule_nb + len(ip_ranges or []) + len(source_groups or [])
        if wanted > quota:
            raise RulesPerSecurityGroupLimitExceededError()

    SecurityGroupBackend._verify_group_will_respect_rule_count_limit = verify
    SecurityGroupBackend._berth_quota = True


@hooks.on_infra_start()
def berth_security_group_quota():
    """Installed at start, before the environment creates its groups."""
    install_rules_quota()
