//! Reasons of the `berth.dev/LoadBalancerReady` condition that any part of the controller
//! may give. Its own module so the Service reconciler and every provider name them without
//! depending on each other; reasons only one provider gives live with that provider.

pub const PROVISIONED: &str = "Provisioned";
pub const PROVISIONING: &str = "Provisioning";
pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
pub const INVALID_SPEC: &str = "InvalidSpec";
pub const NO_SUBNETS: &str = "NoSubnets";
pub const CLASS_NOT_FOUND: &str = "ClassNotFound";
pub const UNSUPPORTED_PROVIDER: &str = "UnsupportedProvider";
pub const AWS_ERROR: &str = "AWSError";
pub const NAME_CONFLICT: &str = "NameConflict";
pub const DELETION_PROTECTED: &str = "DeletionProtected";
pub const NODE_PORT_ALLOCATION: &str = "NodePortAllocationFailed";
/// A Service annotation the class's `allowedOverrides` does not allow (or explicit subnets
/// outside the class's VPC): nothing is created or changed for the Service.
pub const OVERRIDE_REFUSED: &str = "OverrideRefused";
/// No VPC for the class: neither `vpcID`, `--vpc-id`, nor the nodes' instances say one.
pub const VPC_UNKNOWN: &str = "VPCUnknown";
