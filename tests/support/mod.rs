//! The shared harness for berth's integration tests: real peers (DESIGN.md §5), started on
//! 127.0.0.1 (berth and our own servers on port 0, reported back; peers that must be told
//! a port up front on a free one), each owned by a value whose `Drop` kills its process by
//! PID.
//!
//! This module owns the small pieces every peer needs: free ports, finding a peer's binary
//! (a missing peer fails the test, it never skips it), bounded waits, running a CLI with a
//! deadline, and the HTTP client tests talk with. Each peer lives in its own submodule:
//! `registry` (CNCF distribution), `token` (a JWT issuer that registry trusts), `image`
//! (OCI layouts built offline and pushed with skopeo) and `garage` (the S3 object store
//! behind the shared tier).

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod auth;
pub mod bench;
pub mod berth;
pub mod containerd;
pub mod fleet;
pub mod front;
pub mod garage;
pub mod hub;
pub mod image;
pub mod registry;
pub mod token;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often bounded waits poll: short enough that tests stay quick.
const POLL: Duration = Duration::from_millis(20);

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// For peers that must be told their port up front (docker-registry); servers in this
/// harness that we write ourselves bind port 0 instead and have no race at all.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The path of a peer's binary, searched in `PATH` and the sbin directories.
///
/// Panics when it is missing: a test that needs a peer must fail loudly, not skip.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| panic!("{name} not found: run scripts/install-test-peers.sh"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Polls `url` until any HTTP answer arrives (whatever its status) and returns that status.
///
/// Panics after `timeout`: a peer that never listens is a failed test.
pub async fn wait_for_http(url: &str, timeout: Duration) -> reqwest::StatusCode {
    let deadline = Instant::now() + timeout;
    let client = http();
    loop {
        let attempt = client.get(url).timeout(Duration::from_secs(2)).send().await;
        match attempt {
            Ok(response) => return response.status(),
            Err(err) if Instant::now() >= deadline => {
                panic!("{url} did not answer within {timeout:?}: {err}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Stops a peer the way Kubernetes does: SIGTERM, up to `grace` to exit, then SIGKILL.
/// Blocking (a peer takes a moment to drain).
pub fn terminate(mut child: std::process::Child, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The parts a benchmark binary was asked to run, or `None` when it was not started by
/// `cargo bench` (which passes `--bench`): `cargo test --all-targets` runs bench binaries
/// too, and must not start minutes of benchmarks. Empty means all.
pub fn bench_selection() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return None;
    }
    Some(args.into_iter().filter(|a| !a.starts_with("--")).collect())
}

/// Polls `check` every few milliseconds until it holds, or `timeout` passes; says which.
/// The one place tests wait for something observable (an object in a bucket, a replica
/// ready again) instead of sleeping for a guessed time.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A request's answer read as JSON, whatever its status: `.json_answer().await` instead
/// of `.send().await.unwrap().json().await.unwrap()`.
pub trait JsonAnswer {
    fn json_answer(self) -> impl std::future::Future<Output = serde_json::Value>;
}

impl JsonAnswer for reqwest::RequestBuilder {
    async fn json_answer(self) -> serde_json::Value {
        let resp = self.send().await.expect("send the request");
        let status = resp.status();
        resp.json()
            .await
            .unwrap_or_else(|e| panic!("a JSON answer ({status}): {e}"))
    }
}

/// A plain-HTTP client for talking to peers and to berth.
///
/// A fresh client per call, on purpose: each `#[tokio::test]` has its own runtime, and a
/// client shared across runtimes keeps pooled connections whose tasks died with an earlier
/// runtime. System proxies are ignored so loopback traffic never leaves the machine.
pub fn http() -> reqwest::Client {
    // reqwest is built without a default TLS provider; it panics unless one is installed,
    // even for plain HTTP. A second install in the same process fails harmlessly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build reqwest client")
}

/// What a finished CLI run left behind.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// Panics with the command's output unless it exited 0.
    pub fn expect_success(self, what: &str) -> Self {
        assert!(
            self.status.success(),
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `command` to completion, killing it by PID if it outlives `timeout` (which panics).
///
/// Output goes to temporary files rather than pipes, so a chatty child can never block on
/// a full pipe while we poll it. Blocking: call it from `spawn_blocking` in async code.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> CommandOutput {
    let stdout = tempfile::tempfile().expect("stdout tempfile");
    let stderr = tempfile::tempfile().expect("stderr tempfile");
    command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("clone stdout"))
        .stderr(stderr.try_clone().expect("clone stderr"));
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {command:?}: {err}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} still running after {timeout:?}; killed it.\nstderr:\n{}",
                read_all(stderr)
            );
        }
        std::thread::sleep(POLL);
    };
    CommandOutput {
        status,
        stdout: read_all(stdout),
        stderr: read_all(stderr),
    }
}

/// Async wrapper of [`run_with_timeout`] for tests running on tokio.
pub async fn run_with_timeout_async(command: Command, timeout: Duration) -> CommandOutput {
    tokio::task::spawn_blocking(move || run_with_timeout(command, timeout))
        .await
        .expect("command task panicked")
}

fn read_all(mut file: File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut text);
    text
}
