//! Pure parts of `berth-bench-metallb` (berth's pool addresses against MetalLB on the
//! same environment and Services): the result keys (`bare.<figure>` for berth,
//! `compare.metallb.<figure>` for MetalLB, `compare.metallb.berth_over_metallb.<figure>`
//! for the ratios) and the table the README shows. A figure a side could not measure
//! (a timeout, say) is `None`: written as `null`, never left out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

/// One side's figures by name; `None` for a miss.
pub type Figures = BTreeMap<String, Option<f64>>;

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Whether `name` is a time (`…_s`, `…_ms`): counts get no ratio.
fn is_time(name: &str) -> bool {
    name.ends_with("_s") || name.ends_with("_ms")
}

/// berth / MetalLB, when both were measured and MetalLB's is not zero.
pub fn ratio(berth: Option<f64>, metallb: Option<f64>) -> Option<f64> {
    match (berth, metallb) {
        (Some(b), Some(m)) if m != 0.0 => Some(round3(b / m)),
        _ => None,
    }
}

/// Every figure of either side under its key, with the ratio of those both have.
pub fn result_keys(berth: &Figures, metallb: &Figures) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (name, v) in berth {
        out.insert(format!("bare.{name}"), json!(v.map(round3)));
    }
    for (name, v) in metallb {
        out.insert(format!("compare.metallb.{name}"), json!(v.map(round3)));
        if let Some(r) = ratio(berth.get(name).copied().flatten(), *v).filter(|_| is_time(name)) {
            out.insert(
                format!("compare.metallb.berth_over_metallb.{name}"),
                json!(r),
            );
        }
    }
    out
}

/// A Markdown table: one row per figure of either side, `miss` where one was not
/// measured, `–` for a ratio that cannot be taken.
pub fn table(berth: &Figures, metallb: &Figures) -> String {
    let show = |v: Option<&Option<f64>>| match v {
        Some(Some(x)) => format!("{}", round3(*x)),
        _ => "miss".to_string(),
    };
    let mut names: Vec<&String> = berth.keys().chain(metallb.keys()).collect();
    names.sort();
    names.dedup();
    let mut out =
        String::from("| figure | berth | MetalLB | berth / MetalLB |\n|---|---:|---:|---:|\n");
    for name in names {
        let r = ratio(
            berth.get(name).copied().flatten(),
            metallb.get(name).copied().flatten(),
        )
        .filter(|_| is_time(name))
        .map_or("–".to_string(), |r| r.to_string());
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {r} |",
            show(berth.get(name)),
            show(metallb.get(name))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(v: &[(&str, Option<f64>)]) -> Figures {
        v.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn keys_carry_both_sides_misses_and_ratios() {
        let b = figures(&[
            ("announce_s", Some(10.0)),
            ("gap_ms", None),
            ("late_s", Some(1.0)),
            ("changed", Some(2.0)),
        ]);
        let m = figures(&[
            ("announce_s", Some(4.0)),
            ("gap_ms", Some(900.0)),
            ("late_s", Some(0.0)),
            ("changed", Some(1.0)),
        ]);
        let k = result_keys(&b, &m);
        assert_eq!(k["bare.announce_s"], json!(10.0));
        assert_eq!(k["bare.gap_ms"], Value::Null);
        assert_eq!(k["compare.metallb.gap_ms"], json!(900.0));
        assert_eq!(
            k["compare.metallb.berth_over_metallb.announce_s"],
            json!(2.5)
        );
        // No ratio of a miss, over a zero, nor of a count.
        assert!(!k.contains_key("compare.metallb.berth_over_metallb.gap_ms"));
        assert!(!k.contains_key("compare.metallb.berth_over_metallb.late_s"));
        assert!(!k.contains_key("compare.metallb.berth_over_metallb.changed"));
        assert_eq!(k.len(), 9);
    }

    #[test]
    fn the_table_shows_misses() {
        let b = figures(&[("a_s", Some(1.0)), ("b_s", None), ("n", Some(2.0))]);
        let m = figures(&[("a_s", Some(3.0)), ("n", Some(1.0))]);
        let t = table(&b, &m);
        assert!(t.contains("| a_s | 1 | 3 | 0.333 |"), "{t}");
        assert!(t.contains("| b_s | miss | miss | – |"), "{t}");
        assert!(t.contains("| n | 2 | 1 | – |"), "{t}");
    }
}
