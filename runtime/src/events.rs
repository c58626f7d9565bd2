//! Events as both binaries publish them through kube-runtime's recorder.

use kube::runtime::events::Event;
use sha2::{Digest, Sha256};

/// `ev` with its note's digest in its action. kube-runtime's recorder folds an Event
/// with the type, reason and action of one it sent in the last 6 minutes into that one's
/// series, which keeps the first note: a second `AnnouncerChanged` would still say who
/// announced first, a second refusal of a Service would still name the first address.
/// Repeats of the same note still fold into one series. Pure.
pub fn distinct(ev: &Event) -> Event {
    let digest = Sha256::digest(ev.note.as_deref().unwrap_or_default().as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    Event {
        type_: ev.type_,
        reason: ev.reason.clone(),
        note: ev.note.clone(),
        action: format!("{}-{hex}", ev.action),
        secondary: ev.secondary.clone(),
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::events::EventType;

    use super::*;

    fn event(note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: "AnnouncerChanged".into(),
            note: Some(note.into()),
            action: "Announce".into(),
            secondary: None,
        }
    }

    #[test]
    fn events_with_other_notes_get_other_actions() {
        let a = distinct(&event("198.19.0.5 now announced by n1 (was none)"));
        let b = distinct(&event("198.19.0.5 now announced by n2 (was n1)"));
        assert_ne!(a.action, b.action, "a new note starts a new Event");
        assert_eq!(
            a.action,
            distinct(&event("198.19.0.5 now announced by n1 (was none)")).action,
            "the same note folds into one series"
        );
        assert!(a.action.starts_with("Announce-") && a.action.len() <= 128);
        assert_eq!(
            (a.reason, a.note),
            (
                "AnnouncerChanged".to_string(),
                event("198.19.0.5 now announced by n1 (was none)").note
            )
        );
    }
}
