//! A request loop from a namespace (the client, say) while something fails over, and the
//! gap it saw: one request per period, each on a new connection. And [`answering`]: many
//! addresses asked at once from a namespace, without a process per request.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::testing::curl_in;

/// Requests to `url` from `netns` every `period` (one at a time, each given 1 s unless
/// said otherwise), answered when the body holds `expect`: (sent at, answered) per
/// request. Stops on [`RequestLoop::finish`] or drop.
pub struct RequestLoop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Instant, bool)>>>,
}

impl RequestLoop {
    pub fn start(netns: &str, url: &str, expect: &str, period: Duration) -> Self {
        Self::with_timeout(netns, url, expect, period, Duration::from_secs(1))
    }

    /// Each request given `timeout`: a request caught by an outage fails after it, so the
    /// next one goes out soon and the gap measures the outage, not the timeout.
    pub fn with_timeout(
        netns: &str,
        url: &str,
        expect: &str,
        period: Duration,
        timeout: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, url, expect, flag) = (
            netns.to_string(),
            url.to_string(),
            expect.to_string(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = curl_in(&netns, &url, timeout).is_ok_and(|b| b.contains(&expect));
                samples.push((t, ok));
                std::thread::sleep(period.saturating_sub(t.elapsed()));
            }
            samples
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop; every request's (sent at, answered).
    pub fn finish(mut self) -> Vec<(Instant, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Requests sent from `from` on: how many, how many failed, and the longest time between
/// two answered ones (the last one before `from` included).
pub fn gap(samples: &[(Instant, bool)], from: Instant) -> (usize, usize, Duration) {
    let before = samples
        .iter()
        .rev()
        .find(|(t, ok)| *ok && *t < from)
        .map(|s| s.0);
    let after: Vec<&(Instant, bool)> = samples.iter().filter(|(t, _)| *t >= from).collect();
    let failures = after.iter().filter(|(_, ok)| !*ok).count();
    let mut longest = Duration::ZERO;
    let mut last = before;
    for (t, ok) in after.iter().copied() {
        if *ok {
            if let Some(l) = last {
                longest = longest.max(t.duration_since(l));
            }
            last = Some(*t);
        }
    }
    (after.len(), failures, longest)
}

/// How long after `from` the first request sent then was answered, when one was.
pub fn resumed(samples: &[(Instant, bool)], from: Instant) -> Option<Duration> {
    samples
        .iter()
        .find(|(t, ok)| *ok && *t >= from)
        .map(|(t, _)| t.duration_since(from))
}

/// Moves the calling thread into network namespace `netns` (`ip netns` names it).
fn enter_netns(netns: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    // SAFETY: setns(2) of this thread only, with an fd we hold open.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One HTTP GET of `http://ip/` on a new connection; whether the answer holds `expect`.
fn answers(ip: IpAddr, expect: &str, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(ip, 80), timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!("GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body);
    String::from_utf8_lossy(&body).contains(expect)
}

/// Asks every address in `ips` once from inside `netns` (`workers` threads moved into
/// it, one connection per address): which answered with `expect` within `timeout`.
/// Threads instead of `curl` processes: hundreds of addresses a round stay cheap.
pub fn answering(
    netns: &str,
    ips: &[IpAddr],
    expect: &str,
    timeout: Duration,
    workers: usize,
) -> Vec<bool> {
    let next = AtomicUsize::new(0);
    let ok: Vec<AtomicBool> = ips.iter().map(|_| AtomicBool::new(false)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, ips.len().max(1)) {
            s.spawn(|| {
                if let Err(e) = enter_netns(netns) {
                    eprintln!("enter {netns}: {e}");
                    return;
                }
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(ip) = ips.get(i) else { break };
                    ok[i].store(answers(*ip, expect, timeout), Ordering::Relaxed);
                }
            });
        }
    });
    ok.iter().map(|b| b.load(Ordering::Relaxed)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_runs_from_the_last_answer_before_to_the_first_after() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let samples = [
            (at(0), true),
            (at(100), true),
            (at(200), false),
            (at(300), false),
            (at(400), true),
            (at(500), true),
        ];
        assert_eq!(gap(&samples, at(150)), (4, 2, Duration::from_millis(300)));
        assert_eq!(gap(&samples, at(450)), (1, 0, Duration::from_millis(100)));
        assert_eq!(resumed(&samples, at(150)), Some(Duration::from_millis(250)));
        assert_eq!(resumed(&samples, at(600)), None);
    }
}
