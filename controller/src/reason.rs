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
