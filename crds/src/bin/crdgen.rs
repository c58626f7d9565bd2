//! Writes berth's CRD YAML (no CRDs are defined yet).
fn main() {}
