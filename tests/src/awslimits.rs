//! AWS's request rate limits in LocalStack (the extension's `/_berth/ratelimit`), and the
//! controller's AWS calls by operation read from its metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::env::EnvInfo;
use crate::error::{Error, Result};

fn url(info: &EnvInfo) -> String {
    format!("{}/_berth/ratelimit", info.localstack_endpoint)
}

/// Switches the limits on (`scale`: a factor on every bucket's size and refill rate) or
/// off; buckets start full. Answers the extension's view (table, refusals).
pub async fn set(info: &EnvInfo, enabled: bool, scale: f64) -> Result<serde_json::Value> {
    let url = url(info);
    let body = serde_json::json!({"enabled": enabled, "scale": scale});
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| Error::Setup(format!("POST {url}: {e}")))?;
    if !resp.status().is_success() {
        return Err(Error::Setup(format!("POST {url}: {}", resp.status())));
    }
    resp.json()
        .await
        .map_err(|e| Error::Setup(format!("POST {url}: {e}")))
}

/// The extension's view: `enabled`, `scale`, `refused` per bucket, `rates`.
pub async fn view(info: &EnvInfo) -> Result<serde_json::Value> {
    let url = url(info);
    reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| Error::Setup(format!("GET {url}: {e}")))?
        .json()
        .await
        .map_err(|e| Error::Setup(format!("GET {url}: {e}")))
}

/// Turns the limits off when dropped, also after a failed assertion: LocalStack outlives
/// the suite and the next suites must not meet its limits.
pub struct LimitsGuard {
    url: String,
}

impl LimitsGuard {
    pub async fn enable(info: &EnvInfo, scale: f64) -> Result<Self> {
        set(info, true, scale).await?;
        Ok(Self { url: url(info) })
    }
}

impl Drop for LimitsGuard {
    fn drop(&mut self) {
        // Blocking on purpose (Drop cannot await): a short curl.
        let _ = std::process::Command::new("curl")
            .args(["-sf", "-m", "5", "-X", "POST", "-H"])
            .arg("Content-Type: application/json")
            .args(["-d", r#"{"enabled": false}"#, &self.url])
            .output();
    }
}

/// `berth_aws_calls_total` by operation and outcome, from a controller's metrics text.
pub fn calls_by_operation(metrics: &str) -> BTreeMap<(String, String), f64> {
    let label = |line: &str, key: &str| -> Option<String> {
        let start = line.find(&format!("{key}=\""))? + key.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_string())
    };
    let mut out = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("berth_aws_calls_total{"))
    {
        let (Some(op), Some(outcome), Some(value)) = (
            label(line, "operation"),
            label(line, "outcome"),
            line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        *out.entry((op, outcome)).or_insert(0.0) += value;
    }
    out
}

/// The difference of two [`calls_by_operation`] readings, zero entries left out.
pub fn calls_since(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_by_operation_and_outcome() {
        let text = "# TYPE berth_aws_calls counter\n\
            berth_aws_calls_total{operation=\"CreateListener\",outcome=\"success\",mutating=\"true\"} 2\n\
            berth_aws_calls_total{operation=\"DescribeTags\",outcome=\"throttled\",mutating=\"false\"} 3\n";
        let calls = calls_by_operation(text);
        assert_eq!(
            calls.get(&("CreateListener".into(), "success".into())),
            Some(&2.0)
        );
        assert_eq!(
            calls.get(&("DescribeTags".into(), "throttled".into())),
            Some(&3.0)
        );
        let later = BTreeMap::from([(("CreateListener".into(), "success".into()), 5.0)]);
        assert_eq!(
            calls_since(&calls, &later),
            BTreeMap::from([(("CreateListener".into(), "success".into()), 3.0)])
        );
    }
}
