//! Names ELBv2 accepts for load balancers and target groups.

use sha2::{Digest, Sha256};

/// Largest name ELBv2 accepts for load balancers and target groups.
pub const MAX_NAME: usize = 32;

/// A name ELBv2 accepts (≤ 32 of `[a-z0-9-]`, no leading, trailing or double hyphen),
/// stable for a Service UID: `<prefix>-<ns>-<name>-<hash>`.
pub fn resource_name(prefix: &str, namespace: &str, name: &str, hash_input: &str) -> String {
    let digest = Sha256::digest(hash_input.as_bytes());
    let hash: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    let room = MAX_NAME.saturating_sub(prefix.len() + hash.len() + 3) / 2;
    let part = |s: &str| -> String {
        let clean: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .take(room)
            .collect();
        if clean.is_empty() { "x".into() } else { clean }
    };
    format!("{prefix}-{}-{}-{hash}", part(namespace), part(name))
}

/// A load balancer name ELBv2 accepts.
pub fn valid_lb_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.starts_with("internal-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_valid_and_stable() {
        let a = resource_name("k8s", "Default-NS", "my_very_long_service_name", "uid-1");
        assert!(a.len() <= MAX_NAME, "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{a}"
        );
        assert!(!a.contains("--"));
        assert_eq!(
            a,
            resource_name("k8s", "Default-NS", "my_very_long_service_name", "uid-1")
        );
        assert_ne!(
            a,
            resource_name("k8s", "Default-NS", "my_very_long_service_name", "uid-2")
        );
        assert!(resource_name("longpref", "a", "b", "x").len() <= MAX_NAME);
        assert!(resource_name("k8s", "", "-", "x").starts_with("k8s-x-x-"));
        assert!(valid_lb_name(&a));
    }

    #[test]
    fn load_balancer_names_parse_strictly() {
        assert!(valid_lb_name("abc-1"));
        assert!(!valid_lb_name("internal-x"));
        assert!(!valid_lb_name(&"a".repeat(33)));
        assert!(!valid_lb_name("a_b"));
        assert!(!valid_lb_name("-a"));
        assert!(!valid_lb_name(""));
    }
}
