//! Running commands and supervising long-lived child processes.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("spawn", program))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs a command whose failure is expected at times (cleanup of things that may not exist).
pub fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes `cmd` a process that outlives its parent: a session of its own, and none of the
/// descriptors the parent inherited. The e2e scripts' lock file is one of them: kept by an
/// orphaned supervisor after its script was killed, it would block every later run (the
/// next `up` sweeps such an orphan instead). Close-on-exec rather than close keeps std's
/// own exec-error pipe working.
pub fn detach(cmd: &mut Command) {
    // SAFETY: setsid(2) and close_range(2) only, both async-signal-safe, between fork and
    // exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            if libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A long-lived child in its own process group, killed (group and all) on drop.
/// It also dies with the harness: PR_SET_PDEATHSIG is set before exec.
pub struct Supervised {
    pub name: String,
    child: Child,
}

impl Supervised {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).map_err(Error::io("create log", log))?;
        let err = out.try_clone().map_err(Error::io("clone log", log))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(Error::io("spawn", name))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Some(status) when the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// SIGTERM to the group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let pgid = self.child.id() as i32;
        // SAFETY: plain kill(2) on our own child's process group.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; also reaps stragglers left in the group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Ports the harness hands to its servers: below Linux's default ephemeral range
/// (32768-60999), so an outgoing connection of another process, which takes its local
/// port from that range and holds it without SO_REUSEADDR, can never occupy the port
/// between this choice and the server's bind (the flood suites open thousands of them).
const SERVER_PORTS: std::ops::Range<u16> = 20000..32768;

/// A port free on `ip` now, picked at random from [`SERVER_PORTS`].
pub fn free_port(ip: &str) -> Result<u16> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut last = None;
    for _ in 0..500 {
        let port = rng.random_range(SERVER_PORTS);
        match std::net::TcpListener::bind((ip, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("no port tried"));
    Err(Error::io("bind free port", ip.to_string())(e))
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A detached child holds no descriptor its parent inherited without close-on-exec
    /// (as a shell's `exec 9>lock` is).
    #[test]
    fn a_detached_child_keeps_no_inherited_descriptor() {
        let dir = std::env::temp_dir().join(format!("berth-detach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lock");
        let file = File::create(&path).unwrap();
        // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) };
        let held_by = |detached: bool| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30").stdin(Stdio::null());
            if detached {
                detach(&mut cmd);
            }
            let mut child = cmd.spawn().unwrap();
            let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap();
            let holds = fds
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path));
            let _ = child.kill();
            let _ = child.wait();
            holds
        };
        // The check itself sees an inherited descriptor.
        assert!(
            held_by(false),
            "an undetached child inherits the descriptor"
        );
        assert!(
            !held_by(true),
            "the detached child kept the parent's descriptor"
        );
        drop(file);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
