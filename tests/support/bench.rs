//! What the benchmarks (`benches/e2e.rs`, `benches/fleet.rs`) share, so that every table is
//! measured the same way:
//!
//! - knobs from the environment (`BENCH_*`), medians, rates;
//! - what a process spent, from `/proc`: CPU seconds (utime + stime of the process and of
//!   its live children, so nginx's workers count), peak RSS, the whole machine's busy time;
//! - the client: `curl` processes, never an in-process client (one would be slower than
//!   the server under test), each bounded by `--max-time`, run at once and waited for;
//! - the reference file server, nginx (plain HTTP/1.1 with sendfile, h2c and TLS), and the
//!   self-signed certificate the TLS figures use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;
pub const GIB: f64 = (1024 * MIB) as f64;
/// No client runs longer than this: every load stops by itself.
pub const CURL_MAX_SECS: &str = "900";

// ---------------------------------------------------------------------------------------
// Knobs and arithmetic.

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated list of counts (`BENCH_N=1,10,50`).
pub fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The median (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

pub fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

// ---------------------------------------------------------------------------------------
// What the machine and the processes spent.

/// `sysconf(_SC_CLK_TCK)` (asked of `getconf` once): the unit of utime and stime in /proc.
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/<pid>/stat after the command name (which may hold spaces): field 3,
/// the state, is index 0, so the parent is 1, utime 11, stime 12, cutime 13, cstime 14.
pub fn stat_fields(pid: &str) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// utime + stime in clock ticks, if the process is there.
fn own_ticks(pid: &str) -> Option<u64> {
    let f = stat_fields(pid);
    (f.len() > 12).then(|| f[11] + f[12])
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|child| stat_fields(&child.to_string()).get(1) == Some(&u64::from(pid)))
        .collect()
}

/// CPU seconds (utime + stime, every thread) of a process and of its live children (nginx
/// serves from worker processes); NaN when the process is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let Some(own) = own_ticks(&pid.to_string()) else {
        return f64::NAN;
    };
    let children: u64 = children_of(pid)
        .iter()
        .filter_map(|c| own_ticks(&c.to_string()))
        .sum();
    (own + children) as f64 / clock_ticks()
}

/// This process (in-process peers such as the upstream front run here) and the children
/// it has waited for (the curl clients, sha256sum, skopeo), in seconds.
pub fn self_and_children_cpu() -> f64 {
    let f = stat_fields("self");
    (f[11] + f[12] + f[13] + f[14]) as f64 / clock_ticks()
}

/// Busy CPU seconds of the whole machine so far (every core), from /proc/stat.
pub fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    busy as f64 / clock_ticks()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The most resident memory the process ever had (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Prints the machine, the commit and the load: what a table's figures depend on.
pub fn describe_machine() {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let mut commit = git(&["rev-parse", "--short", "HEAD"]);
    if commit.is_empty() {
        commit = "unknown (not a git checkout)".to_owned();
    }
    let dirty = if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    println!(
        "Machine: {cores} CPUs ({model}); commit {commit}{dirty}; load average {}",
        loadavg()
    );
}

// ---------------------------------------------------------------------------------------
// curl, the client.

/// curl, quiet but for errors, ignoring proxies from the environment, bounded in time.
pub fn curl() -> Command {
    let mut c = Command::new(super::require_tool("curl"));
    c.args(["-sS", "--noproxy", "*", "--max-time", CURL_MAX_SECS]);
    c
}

/// What `-w` reports, on stdout (or stderr when the body goes to stdout); curl turns
/// the `\n` at the end into a newline.
pub const WRITE_OUT: &str = "%{http_code} %{size_download} %{time_total} %{num_redirects} \
    %{http_version} %{redirect_url}\\n";

/// What one curl reported.
#[derive(Debug)]
pub struct Got {
    pub code: u16,
    pub bytes: u64,
    /// curl's own `time_total`: from its start to the last byte, process start-up aside.
    pub secs: f64,
    pub redirects: u32,
    /// The HTTP version of the last response: `1.1`, `2`.
    pub version: String,
    pub location: String,
    /// `sha256:<hex>` of the body, when it was piped into sha256sum.
    pub digest: Option<String>,
}

fn parse_write_out(text: &str) -> Option<Got> {
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut f = line.split_whitespace();
    Some(Got {
        code: f.next()?.parse().ok()?,
        bytes: f.next()?.parse().ok()?,
        secs: f.next()?.parse().ok()?,
        redirects: f.next()?.parse().ok()?,
        version: f.next()?.to_owned(),
        location: f.next().unwrap_or_default().to_owned(),
        digest: None,
    })
}

/// A GET that throws the body away and reports [`WRITE_OUT`]; more options (headers,
/// `-L`, `--http2`) may follow, curl takes them after the URL too.
pub fn get(url: &str) -> Command {
    let mut c = curl();
    c.args(["-o", "/dev/null", "-w", WRITE_OUT, url]);
    c
}

/// What a finished curl reported; panics when it failed. `hashed`: its body went to
/// `sha256sum` (see fleet's `hashed_get_cmd`), and the figures to stderr.
pub fn parse_output(out: &Output, hashed: bool) -> Got {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let figures = if hashed { &stderr } else { &stdout };
    let mut got = parse_write_out(figures).unwrap_or_else(|| {
        panic!(
            "curl failed ({}): stdout {stdout:?}, stderr {stderr:?}",
            out.status
        )
    });
    assert!(
        out.status.success(),
        "curl failed ({}): {stderr}",
        out.status
    );
    if hashed {
        got.digest = stdout
            .split_whitespace()
            .next()
            .map(|hex| format!("sha256:{hex}"));
    }
    got
}

/// Runs the commands at once; returns their outputs (in order) and the wall time until
/// the last one exited. Blocking: call from `spawn_blocking` (or use [`run_all_async`]).
pub fn run_all(cmds: Vec<Command>) -> (Vec<Output>, Duration) {
    let started = Instant::now();
    let children: Vec<_> = cmds
        .into_iter()
        .map(|mut c| {
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a client")
        })
        .collect();
    let outputs = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait for a client"))
        .collect();
    (outputs, started.elapsed())
}

/// [`run_all`] on a blocking thread: in-process peers keep serving meanwhile.
pub async fn run_all_async(cmds: Vec<Command>) -> (Vec<Output>, Duration) {
    tokio::task::spawn_blocking(move || run_all(cmds))
        .await
        .expect("client thread")
}

/// One curl, waited for on a blocking thread.
pub async fn run_one(cmd: Command) -> Got {
    let (mut out, _) = run_all_async(vec![cmd]).await;
    parse_output(&out.remove(0), false)
}

/// Runs the GETs ([`get`]) at once; panics unless every one succeeded with 200. Returns
/// what each got and the wall time until the last one exited.
pub async fn get_all(cmds: Vec<Command>) -> (Vec<Got>, Duration) {
    let (outputs, wall) = run_all_async(cmds).await;
    let got: Vec<Got> = outputs.iter().map(|o| parse_output(o, false)).collect();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.code, 200, "client {i}: {g:?}");
    }
    (got, wall)
}

// ---------------------------------------------------------------------------------------
// Peers.

/// Faults that send each connection's bodies at `rate_mib` MiB/s (a CDN), or unlimited.
pub fn throttle(rate_mib: Option<u64>) -> super::front::Faults {
    super::front::Faults {
        throttle: rate_mib.map(|r| r * MIB),
        ..super::front::Faults::default()
    }
}

/// A front on `upstream` sending each connection's bodies at `rate_mib` MiB/s, or unlimited.
pub async fn throttled_front(upstream: &str, rate_mib: Option<u64>) -> super::front::Front {
    let front = super::front::Front::start(upstream).await;
    front.set_faults(throttle(rate_mib));
    front
}

// ---------------------------------------------------------------------------------------
// Client credentials for berth's `[auth]`.

/// The header line (`-H` for curl and wrk) that sends a bearer token.
pub fn bearer_header(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// The header line that sends a user and password with `Basic`.
pub fn basic_header(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Authorization: Basic {creds}")
}

// ---------------------------------------------------------------------------------------
// The reference file server and TLS.

/// A self-signed certificate for 127.0.0.1 (EC P-256, made by the `openssl` CLI as the
/// token issuer's is); clients trust it with `--cacert`.
pub struct SelfSigned {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl SelfSigned {
    pub fn new() -> SelfSigned {
        let dir = tempfile::tempdir().expect("tls tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let mut openssl = Command::new(super::require_tool("openssl"));
        openssl
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        super::run_with_timeout(openssl, Duration::from_secs(60))
            .expect_success("openssl req -x509");
        SelfSigned {
            cert,
            key,
            _dir: dir,
        }
    }

    /// The `[server]` lines that make berth serve this certificate.
    pub fn server_lines(&self) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            self.cert.display(),
            self.key.display()
        )
    }

    /// The curl options that trust this certificate.
    pub fn curl_args(&self) -> Vec<String> {
        vec!["--cacert".into(), self.cert.display().to_string()]
    }
}

/// nginx serving a directory: plain HTTP/1.1 with sendfile on `port`, h2c (prior
/// knowledge) on `h2c_port`, and, when started with a certificate, HTTP/1.1 and HTTP/2 over
/// TLS (by ALPN) on `tls_port`. Killed on drop.
pub struct Nginx {
    /// The master; its workers are its children.
    child: Option<Child>,
    pub port: u16,
    pub h2c_port: u16,
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Self::start_with(root, None)
    }

    pub fn start_with(root: &Path, tls: Option<&SelfSigned>) -> Nginx {
        let bin = super::require_tool("nginx");
        let dir = tempfile::tempdir().expect("nginx tempdir");
        let (port, h2c_port) = (super::free_port(), super::free_port());
        let tls_port = tls.map(|_| super::free_port());
        let conf_path = dir.path().join("nginx.conf");
        let conf = nginx_conf(dir.path(), root, [port, h2c_port], tls_port.zip(tls));
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child: Some(child),
            port,
            h2c_port,
            tls_port,
            dir,
        };
        nginx.wait_listening();
        nginx
    }

    /// Up to 10 s for every port to accept; panics with the error log if nginx exits.
    fn wait_listening(&mut self) {
        let ports = [Some(self.port), Some(self.h2c_port), self.tls_port];
        let child = self.child.as_mut().expect("nginx runs");
        for port in ports.into_iter().flatten() {
            for _ in 0..200 {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("error.log"));
                    panic!("nginx exited ({status}): {}", log.unwrap_or_default());
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `http://127.0.0.1:port/<path>` (plain HTTP/1.1).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

/// Two workers, sendfile on plain HTTP/1.1 (as a CDN edge would), no access log.
fn nginx_conf(dir: &Path, root: &Path, plain: [u16; 2], tls: Option<(u16, &SelfSigned)>) -> String {
    let d = dir.display();
    let r = root.display();
    let tls_server = tls.map_or(String::new(), |(port, c)| {
        format!(
            "server {{ listen 127.0.0.1:{port} ssl http2; root {r};\n\
               ssl_certificate {}; ssl_certificate_key {}; }}\n",
            c.cert.display(),
            c.key.display()
        )
    });
    format!(
        "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{ access_log off; sendfile on; tcp_nopush on;\n\
           client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
           uwsgi_temp_path {d}; scgi_temp_path {d};\n\
           server {{ listen 127.0.0.1:{}; root {r}; }}\n\
           server {{ listen 127.0.0.1:{} http2; root {r}; }}\n\
           {tls_server} }}\n",
        plain[0], plain[1]
    )
}

impl Drop for Nginx {
    /// SIGTERM first: the master stops its workers (a SIGKILL would orphan them).
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, Duration::from_secs(5));
        }
    }
}
