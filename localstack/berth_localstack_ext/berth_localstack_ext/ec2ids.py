"""Chosen EC2 instance IDs.

LocalStack honours the ``_custom_id_`` tag for VPCs, subnets and security groups but not
for instances, whose IDs moto draws at random. A Node's providerID names its instance and
cannot change, so after a LocalStack restart the test environment must get the same
instance IDs back: RunInstances with one instance and the tag ``_custom_id_`` (in the
instance TagSpecification) creates the instance with that ID.
"""

import re
import threading

from localstack.runtime import hooks

TAG = "_custom_id_"
_ID = re.compile(r"^i-[0-9a-f]{8,17}$")

_pending = threading.local()
_installed = False


def install():
    """Wraps moto's instance ID generator and RunInstances once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import instances

    random_id = instances.random_instance_id

    def instance_id():
        chosen = getattr(_pending, "id", None)
        if chosen:
            _pending.id = None
            return chosen
        return random_id()

    instances.random_instance_id = instance_id
    run_instances = instances.InstanceBackend.run_instances

    def run_with_chosen_id(self, image_id, count, user_data, security_group_names, **kwargs):
        chosen = ((kwargs.get("tags") or {}).get("instance") or {}).get(TAG)
        if chosen is None:
            return run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
        if not _ID.match(chosen):
            raise EC2ClientError("InvalidParameterValue", f"{TAG} {chosen!r} is not an instance ID (i-<8 to 17 hex>)")
        if int(count) != 1:
            raise EC2ClientError("InvalidParameterValue", f"{TAG} needs exactly one instance, not {count}")
        if any(i.id == chosen for i in self.all_instances()):
            raise EC2ClientError("InvalidParameterValue", f"instance {chosen} already exists")
        _pending.id = chosen
        try:
            return run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
        finally:
            _pending.id = None

    instances.InstanceBackend.run_instances = run_with_chosen_id


@hooks.on_infra_start()
def berth_chosen_instance_ids():
    """Installed at start, before the first request: the ELBv2 provider, which could do
    it too, loads lazily, after the environment has already created its instances."""
    install()
