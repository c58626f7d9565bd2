//! berth's API: names shared by the controller, the node agent and the chart.

/// API group of berth's own resources and prefix of its annotations.
pub const GROUP: &str = "berth.dev";
/// Finalizer the controller puts on every Service it provisions for.
pub const FINALIZER: &str = "berth.dev/load-balancer";
/// Field manager for berth's server-side apply writes.
pub const CONTROLLER_MANAGER: &str = "berth-controller";
