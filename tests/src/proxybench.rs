//! Pure parts of `berth-bench-proxies` (berth-nodeproxy against kube-proxy through the
//! real apiserver): percentiles, the `compare.*` result keys with berth / opponent
//! ratios, merging into `target/bench/results.json`, and the SVG plot of programming
//! latency and sync time against the Service count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

/// The proxy every ratio is taken of (`compare.berth_over_<opponent>.<figure>`).
pub const BERTH: &str = "berth";

/// Nearest-rank percentile (`q` in 0..=100) of `values`; None when there are none.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `1000` -> `1k`, `500` -> `500`: the scale part of a figure's key.
pub fn scale_label(services: usize) -> String {
    if services >= 1000 && services.is_multiple_of(1000) {
        format!("{}k", services / 1000)
    } else {
        services.to_string()
    }
}

/// What one proxy showed at one scale.
#[derive(Clone, Debug, Default)]
pub struct RunFigures {
    /// From the first write until every sampled Service answered; None when some never
    /// did within the bench's patience.
    pub sync_all_s: Option<f64>,
    /// How long writing every Service and EndpointSlice took (the apiserver's share).
    pub writes_s: f64,
    /// EndpointSlice write to the first connection reaching a new endpoint, per change.
    pub programming_ms: Vec<f64>,
    /// Changes whose new endpoints never answered within the bench's patience.
    pub programming_misses: usize,
    /// One new Service (Service and EndpointSlice written) until it answered.
    pub new_service_ms: Option<f64>,
    /// CPU seconds of the proxy process from its start until the initial sync was seen.
    pub cpu_sync_s: f64,
    /// CPU seconds of the proxy process over the whole run.
    pub cpu_total_s: f64,
    /// Peak resident set of the proxy process (VmHWM).
    pub peak_rss_mib: f64,
    /// Fresh connections through the rules: connect, request, answer.
    pub first_connection_ms: Vec<f64>,
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The `compare.<proxy>.<figure>_<scale>` keys of one run. Figures that were not
/// measured (a sync that never finished) are left out rather than written as zero.
pub fn figure_keys(proxy: &str, services: usize, f: &RunFigures) -> BTreeMap<String, Value> {
    let s = scale_label(services);
    let mut out: Vec<(String, f64)> = vec![
        (format!("writes_{s}_s"), f.writes_s),
        (
            format!("programming_changes_{s}"),
            f.programming_ms.len() as f64,
        ),
        (
            format!("programming_misses_{s}"),
            f.programming_misses as f64,
        ),
        (format!("cpu_sync_{s}_s"), f.cpu_sync_s),
        (format!("cpu_total_{s}_s"), f.cpu_total_s),
        (format!("peak_rss_{s}_mib"), f.peak_rss_mib),
    ];
    if let Some(v) = f.sync_all_s {
        out.push((format!("sync_all_{s}_s"), v));
    }
    if let Some(v) = f.new_service_ms {
        out.push((format!("new_service_{s}_ms"), v));
    }
    for (name, values) in [
        ("programming", &f.programming_ms),
        ("first_connection", &f.first_connection_ms),
    ] {
        for q in [50.0, 99.0] {
            if let Some(v) = percentile(values, q) {
                out.push((format!("{name}_p{q}_{s}_ms"), v));
            }
        }
    }
    out.into_iter()
        .map(|(k, v)| (format!("compare.{proxy}.{k}"), json!(round3(v))))
        .collect()
}

/// `compare.<proxy>.sync_after_writes_<scale>_s`: how long after the apiserver took the
/// last write every Service answered (the sync time less the writes, which are the same
/// apiserver work for every proxy).
pub fn tail_keys(results: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (key, value) in results {
        let Some(rest) = key.strip_prefix("compare.") else {
            continue;
        };
        // Proxy keys hold dots (kube-proxy-1.36.3), figures never do.
        let Some((proxy, figure)) = rest.rsplit_once('.') else {
            continue;
        };
        let Some(scale) = figure
            .strip_prefix("sync_all_")
            .and_then(|f| f.strip_suffix("_s"))
        else {
            continue;
        };
        let writes = results
            .get(&format!("compare.{proxy}.writes_{scale}_s"))
            .and_then(Value::as_f64);
        if let (Some(sync), Some(writes)) = (value.as_f64(), writes) {
            out.insert(
                format!("compare.{proxy}.sync_after_writes_{scale}_s"),
                json!(round3((sync - writes).max(0.0))),
            );
        }
    }
    out
}

/// `compare.berth_over_<opponent>.<figure>` for every figure both berth and the
/// opponent have (counts of changes and misses are not ratios worth printing).
pub fn ratio_keys(results: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    let prefix = format!("compare.{BERTH}.");
    let mut out = BTreeMap::new();
    for (key, value) in results {
        let Some(figure) = key.strip_prefix(&prefix) else {
            continue;
        };
        if figure.starts_with("programming_changes") || figure.starts_with("programming_misses") {
            continue;
        }
        let Some(ours) = value.as_f64() else { continue };
        for (other, theirs) in results {
            let Some(rest) = other.strip_prefix("compare.") else {
                continue;
            };
            // Proxy keys hold dots (kube-proxy-1.36.3), figures never do.
            let Some((opponent, their_figure)) = rest.rsplit_once('.') else {
                continue;
            };
            if opponent == BERTH || opponent.starts_with("berth_over_") || their_figure != figure {
                continue;
            }
            if let Some(theirs) = theirs.as_f64().filter(|t| *t > 0.0) {
                out.insert(
                    format!("compare.berth_over_{opponent}.{figure}"),
                    json!(round3(ours / theirs)),
                );
            }
        }
    }
    out
}

/// `existing` with `new` laid over it (other benchmarks' keys are kept).
pub fn merged(
    mut existing: BTreeMap<String, Value>,
    new: &BTreeMap<String, Value>,
) -> BTreeMap<String, Value> {
    existing.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
    existing
}

/// Read-modify-write of `path` (results.json), as the other benchmarks do.
pub fn merge_file(path: &Path, new: &BTreeMap<String, Value>) -> std::io::Result<()> {
    let existing: BTreeMap<String, Value> = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let all = merged(existing, new);
    let text = serde_json::to_string_pretty(&all).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// One line of a plot: a proxy's value of a figure at each scale it was measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub proxy: String,
    pub points: Vec<(usize, f64)>,
}

/// The series of `figure` (a key with `{s}` where the scale goes, e.g.
/// `programming_p50_{s}_ms`) for each proxy over `scales`, from result keys.
pub fn series(
    results: &BTreeMap<String, Value>,
    figure: &str,
    proxies: &[String],
    scales: &[usize],
) -> Vec<Series> {
    proxies
        .iter()
        .map(|proxy| Series {
            proxy: proxy.clone(),
            points: scales
                .iter()
                .filter_map(|n| {
                    let key = format!(
                        "compare.{proxy}.{}",
                        figure.replace("{s}", &scale_label(*n))
                    );
                    results.get(&key).and_then(Value::as_f64).map(|v| (*n, v))
                })
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// One chart of the plot.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 340.0;
const MARGIN_L: f64 = 70.0;
const MARGIN_R: f64 = 20.0;
const MARGIN_T: f64 = 40.0;
const MARGIN_B: f64 = 90.0;

/// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten, at least `max`.
pub fn nice_ceiling(max: f64) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let pow = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|c| *c >= max)
        .unwrap_or(10.0 * pow)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Panels side by side as one SVG: Services on x, the figure on y, a line and dots
/// per proxy, the legend under each chart.
pub fn svg(panels: &[Panel]) -> String {
    let width = PANEL_W * panels.len().max(1) as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{PANEL_H}\" \
         viewBox=\"0 0 {width} {PANEL_H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, panel) in panels.iter().enumerate() {
        panel_svg(&mut out, panel, i as f64 * PANEL_W);
    }
    out.push_str("</svg>\n");
    out
}

fn panel_svg(out: &mut String, panel: &Panel, x0: f64) {
    let (left, right) = (x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R);
    let (top, bottom) = (MARGIN_T, PANEL_H - MARGIN_B);
    let x_max = nice_ceiling(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0 as f64))
            .fold(0.0, f64::max),
    );
    let y_max = nice_ceiling(
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let px = |x: f64| left + x / x_max * (right - left);
    let py = |y: f64| bottom - y / y_max * (bottom - top);
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>",
        (left + right) / 2.0,
        escape(&panel.title)
    );
    for t in 0..=5 {
        let (xv, yv) = (x_max * t as f64 / 5.0, y_max * t as f64 / 5.0);
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{right}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left - 6.0,
            py(yv) + 4.0,
            trim_number(yv),
            px(xv),
            bottom + 16.0,
            trim_number(xv),
            y = py(yv),
        );
    }
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"black\"/>\
         <line x1=\"{left}\" x2=\"{right}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"black\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">Services (× 10 endpoints)</text>\
         <text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (left + right) / 2.0,
        bottom + 34.0,
        x0 + 16.0,
        (top + bottom) / 2.0,
        escape(&panel.y_label)
    );
    for (i, s) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x as f64), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        for (x, y) in &s.points {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\"/>",
                px(*x as f64),
                py(*y)
            );
        }
        let ly = bottom + 52.0 + 14.0 * (i / 2) as f64;
        let lx = left + (i % 2) as f64 * 180.0;
        let _ = writeln!(
            out,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{colour}\" \
             stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>",
            lx + 18.0,
            lx + 22.0,
            ly + 4.0,
            escape(&s.proxy)
        );
    }
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Rows of the README table: label and figure key (`{s}` is the scale).
pub const TABLE_ROWS: [(&str, &str); 13] = [
    (
        "writes of all Services + EndpointSlices (s)",
        "writes_{s}_s",
    ),
    (
        "first write → every sampled Service answers (s)",
        "sync_all_{s}_s",
    ),
    (
        "… of which after the last write (s)",
        "sync_after_writes_{s}_s",
    ),
    (
        "network programming latency p50 (ms)",
        "programming_p50_{s}_ms",
    ),
    (
        "network programming latency p99 (ms)",
        "programming_p99_{s}_ms",
    ),
    ("changes answered", "programming_changes_{s}"),
    (
        "changes missed (no answer in 30 s)",
        "programming_misses_{s}",
    ),
    ("one new Service → answers (ms)", "new_service_{s}_ms"),
    ("CPU until synced (s)", "cpu_sync_{s}_s"),
    ("CPU whole run (s)", "cpu_total_{s}_s"),
    ("peak RSS (MiB)", "peak_rss_{s}_mib"),
    ("first connection p50 (ms)", "first_connection_p50_{s}_ms"),
    ("first connection p99 (ms)", "first_connection_p99_{s}_ms"),
];

/// A Markdown table of every figure: a column per proxy, then berth / opponent ratios;
/// `–` where a figure was not measured (a miss).
pub fn markdown_table(
    results: &BTreeMap<String, Value>,
    proxies: &[String],
    scales: &[usize],
) -> String {
    let opponents: Vec<&String> = proxies.iter().filter(|p| *p != BERTH).collect();
    let mut out = String::from("| Services | figure |");
    for p in proxies {
        let _ = write!(out, " {p} |");
    }
    for o in &opponents {
        let _ = write!(out, " berth / {o} |");
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(proxies.len() + opponents.len()));
    out.push('\n');
    let cell = |key: String| {
        results
            .get(&key)
            .and_then(Value::as_f64)
            .map_or("–".to_string(), trim_number)
    };
    for n in scales {
        let s = scale_label(*n);
        for (label, figure) in TABLE_ROWS {
            let figure = figure.replace("{s}", &s);
            let _ = write!(out, "| {s} | {label} |");
            for p in proxies {
                let _ = write!(out, " {} |", cell(format!("compare.{p}.{figure}")));
            }
            for o in &opponents {
                let _ = write!(
                    out,
                    " {} |",
                    cell(format!("compare.berth_over_{o}.{figure}"))
                );
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[3.0, 1.0], 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn scale_labels() {
        assert_eq!(scale_label(1000), "1k");
        assert_eq!(scale_label(10_000), "10k");
        assert_eq!(scale_label(1500), "1500");
        assert_eq!(scale_label(200), "200");
    }

    fn run(sync: Option<f64>, programming: Vec<f64>) -> RunFigures {
        RunFigures {
            sync_all_s: sync,
            writes_s: 3.0,
            programming_ms: programming,
            programming_misses: 1,
            new_service_ms: Some(12.5),
            cpu_sync_s: 0.5,
            cpu_total_s: 2.0,
            peak_rss_mib: 40.0,
            first_connection_ms: vec![0.2, 0.4],
        }
    }

    #[test]
    fn figure_keys_name_proxy_figure_and_scale() {
        let keys = figure_keys("kube-proxy-1.36.3", 5000, &run(Some(4.0), vec![10.0, 30.0]));
        assert_eq!(keys["compare.kube-proxy-1.36.3.sync_all_5k_s"], json!(4.0));
        assert_eq!(
            keys["compare.kube-proxy-1.36.3.programming_p50_5k_ms"],
            json!(10.0)
        );
        assert_eq!(
            keys["compare.kube-proxy-1.36.3.programming_p99_5k_ms"],
            json!(30.0)
        );
        assert_eq!(
            keys["compare.kube-proxy-1.36.3.programming_misses_5k"],
            json!(1.0)
        );
        assert_eq!(
            keys["compare.kube-proxy-1.36.3.first_connection_p50_5k_ms"],
            json!(0.2)
        );
        assert_eq!(
            keys["compare.kube-proxy-1.36.3.new_service_5k_ms"],
            json!(12.5)
        );
    }

    #[test]
    fn unmeasured_figures_are_left_out() {
        let keys = figure_keys(BERTH, 1000, &run(None, vec![]));
        assert!(!keys.contains_key("compare.berth.sync_all_1k_s"));
        assert!(!keys.contains_key("compare.berth.programming_p50_1k_ms"));
        assert_eq!(keys["compare.berth.programming_changes_1k"], json!(0.0));
    }

    #[test]
    fn ratios_are_berth_over_each_opponent() {
        let mut all = figure_keys(BERTH, 1000, &run(Some(1.0), vec![2.0]));
        all.extend(figure_keys("kp", 1000, &run(Some(4.0), vec![8.0])));
        all.extend(figure_keys("kp-new", 1000, &run(None, vec![1.0])));
        all.extend(figure_keys(
            "kube-proxy-1.36.3",
            1000,
            &run(Some(2.0), vec![4.0]),
        ));
        let r = ratio_keys(&all);
        assert_eq!(
            r["compare.berth_over_kube-proxy-1.36.3.programming_p50_1k_ms"],
            json!(0.5)
        );
        assert_eq!(r["compare.berth_over_kp.sync_all_1k_s"], json!(0.25));
        assert_eq!(
            r["compare.berth_over_kp.programming_p50_1k_ms"],
            json!(0.25)
        );
        assert_eq!(
            r["compare.berth_over_kp-new.programming_p50_1k_ms"],
            json!(2.0)
        );
        assert!(!r.contains_key("compare.berth_over_kp-new.sync_all_1k_s"));
        assert!(!r.contains_key("compare.berth_over_kp.programming_misses_1k"));
        assert!(!r.keys().any(|k| k.contains("berth_over_berth")));
        // Ratios of ratios are not taken when earlier ratio keys are in the map.
        all.extend(r);
        assert!(
            !ratio_keys(&all)
                .keys()
                .any(|k| k.contains("berth_over_berth_over"))
        );
    }

    #[test]
    fn merge_keeps_other_benchmarks_and_replaces_ours() {
        let existing: BTreeMap<String, Value> = [
            ("nodeproxy.full_sync_10k_ms".to_string(), json!(1939.2)),
            ("compare.berth.sync_all_1k_s".to_string(), json!(9.0)),
        ]
        .into_iter()
        .collect();
        let new: BTreeMap<String, Value> =
            [("compare.berth.sync_all_1k_s".to_string(), json!(1.5))]
                .into_iter()
                .collect();
        let all = merged(existing, &new);
        assert_eq!(all["nodeproxy.full_sync_10k_ms"], json!(1939.2));
        assert_eq!(all["compare.berth.sync_all_1k_s"], json!(1.5));
        let dir = std::env::temp_dir().join(format!("berth-proxybench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("results.json");
        std::fs::write(&path, r#"{"l2.services": 1000}"#).expect("seed file");
        merge_file(&path, &new).expect("merge");
        let back: BTreeMap<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(back["l2.services"], json!(1000));
        assert_eq!(back["compare.berth.sync_all_1k_s"], json!(1.5));
    }

    #[test]
    fn series_follow_scales_and_skip_missing_points() {
        let mut all = figure_keys(BERTH, 1000, &run(Some(1.0), vec![2.0]));
        all.extend(figure_keys(BERTH, 5000, &run(None, vec![3.0])));
        all.extend(figure_keys("kp", 5000, &run(Some(7.0), vec![9.0])));
        let proxies = vec![BERTH.to_string(), "kp".to_string(), "absent".to_string()];
        let sync = series(&all, "sync_all_{s}_s", &proxies, &[1000, 5000]);
        assert_eq!(
            sync,
            vec![
                Series {
                    proxy: BERTH.into(),
                    points: vec![(1000, 1.0)]
                },
                Series {
                    proxy: "kp".into(),
                    points: vec![(5000, 7.0)]
                },
            ]
        );
        let p50 = series(&all, "programming_p50_{s}_ms", &proxies, &[1000, 5000]);
        assert_eq!(p50[0].points, vec![(1000, 2.0), (5000, 3.0)]);
    }

    #[test]
    fn table_has_a_row_per_figure_and_scale_and_marks_misses() {
        let mut all = figure_keys(BERTH, 1000, &run(Some(1.0), vec![2.0]));
        all.extend(figure_keys("kp", 1000, &run(None, vec![8.0])));
        all.extend(ratio_keys(&all));
        let proxies = vec![BERTH.to_string(), "kp".to_string()];
        let t = markdown_table(&all, &proxies, &[1000]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| Services | figure | berth | kp | berth / kp |");
        assert_eq!(lines.len(), 2 + TABLE_ROWS.len());
        assert!(
            t.contains("| 1k | network programming latency p50 (ms) | 2 | 8 | 0.25 |"),
            "{t}"
        );
        assert!(
            t.contains("| 1k | first write → every sampled Service answers (s) | 1 | – | – |"),
            "{t}"
        );
    }

    #[test]
    fn sync_tail_is_sync_less_writes() {
        let mut all = figure_keys(BERTH, 1000, &run(Some(3.5), vec![]));
        all.extend(figure_keys("kp", 1000, &run(None, vec![])));
        all.extend(figure_keys(
            "kube-proxy-1.37.2",
            1000,
            &run(Some(5.0), vec![]),
        ));
        let t = tail_keys(&all);
        assert_eq!(t["compare.berth.sync_after_writes_1k_s"], json!(0.5));
        assert_eq!(
            t["compare.kube-proxy-1.37.2.sync_after_writes_1k_s"],
            json!(2.0)
        );
        assert_eq!(t.len(), 2, "no tail without a sync time: {t:?}");
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(10.0), 10.0);
        assert_eq!(nice_ceiling(1200.0), 2000.0);
        assert_eq!(nice_ceiling(0.07), 0.1);
    }

    #[test]
    fn svg_draws_a_line_and_legend_per_proxy() {
        let panel = Panel {
            title: "sync <time>".into(),
            y_label: "s".into(),
            series: vec![
                Series {
                    proxy: BERTH.into(),
                    points: vec![(1000, 1.0), (5000, 2.0)],
                },
                Series {
                    proxy: "kube-proxy-1.37.2".into(),
                    points: vec![(1000, 3.0), (5000, 9.0)],
                },
            ],
        };
        let text = svg(&[panel]);
        assert!(text.starts_with("<svg"));
        assert_eq!(text.matches("<polyline").count(), 2);
        assert_eq!(text.matches("<circle").count(), 4);
        assert!(text.contains(">kube-proxy-1.37.2</text>"));
        assert!(text.contains("sync &lt;time&gt;"), "titles are escaped");
        // y axis up to 10 (nice ceiling of 9), x up to 5000: berth's 5000 point sits at
        // the right edge, 1/5 of the way up.
        let bottom = PANEL_H - MARGIN_B;
        let y = bottom - 0.2 * (bottom - MARGIN_T);
        let x = PANEL_W - MARGIN_R;
        assert!(text.contains(&format!("{x:.1},{y:.1}")), "{text}");
    }
}
