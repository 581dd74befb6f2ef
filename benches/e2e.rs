//! End-to-end benchmarks against real peers, each reference measured in the same run. Every
//! client is an external process (`curl` for bytes, `wrk` for request rates); CPU is
//! utime + stime from `/proc/<pid>/stat` (nginx's workers included); figures are medians.
//!
//! - `pull`: warm throughput of a 256 MiB blob through berth and through distribution's
//!   proxy mode (warmed) vs nginx serving the same file; berth's warm blob over h2c, TLS
//!   HTTP/1.1 and TLS HTTP/2 vs its plain HTTP/1.1 (sendfile), nginx alongside; a cold pull
//!   of a 3-layer ~100 MiB image through berth and through distribution's proxy vs straight
//!   from the registry.
//! - `manifest`: cached manifest requests per second (wrk) by tag and by digest through
//!   berth and through distribution's proxy vs nginx serving the same bytes as a file, and
//!   berth by digest over TLS vs nginx over TLS.
//! - `access`: what client authentication and `[[access]]` rules cost a cached manifest by
//!   tag (wrk), against berth without `[auth]` in the same rounds: a bearer token
//!   (`tokens_dir`), htpasswd Basic credentials (bcrypt cost 10, verified once), and a
//!   token with 20 rules, the matching one last.
//! - `herd`: N concurrent cold pulls (curl processes) of one 256 MiB blob through berth vs
//!   through distribution's own proxy mode, behind an upstream limited per connection (a
//!   CDN): upstream bytes, wall time until every client has the whole blob, proxy peak RSS.
//!
//! - `ratelimit`: the demo of `scripts/demo-ratelimit.sh`: a burst of pulls straight at a
//!   Docker Hub emulator (the later ones get 429) and the same burst through berth.
//!
//! Run with `scripts/bench.sh` / `scripts/bench-herd.sh` / `scripts/demo-ratelimit.sh`
//! (or `cargo bench --bench e2e -- pull|cold|manifest|access|herd|ratelimit`). Sizes and
//! rates come from the environment (`BENCH_*`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::bench::{self, env_u64, median, Nginx, SelfSigned, GIB, MIB};
use support::berth::{Berth, Extra, UpstreamSpec};
use support::front::Front;
use support::image::{
    build_image, push, BuiltImage, ImageSpec, Platform, LAYOUT_REF, MANIFEST_MEDIA_TYPE,
};
use support::registry::{Registry, RegistryOptions};

// ---------------------------------------------------------------------------------------
// Peers and requests.

async fn push_image(
    registry: &Registry,
    dir: &Path,
    repo: &str,
    layers: &[u64],
    seed: u64,
) -> BuiltImage {
    let spec = ImageSpec {
        layer_sizes: layers.iter().map(|l| *l as usize).collect(),
        seed,
    };
    let img = build_image(
        &dir.join(format!("img-{seed}")),
        &spec,
        Platform::LINUX_AMD64,
    );
    push(
        &img.layout,
        LAYOUT_REF,
        &format!("{}/{repo}:v1", registry.host()),
        None,
    )
    .await;
    img
}

fn blob_url(base: &str, repo: &str, digest: &str) -> String {
    format!("{base}/v2/{repo}/blobs/{digest}")
}

fn manifest_url(base: &str, repo: &str, reference: &str) -> String {
    format!("{base}/v2/{repo}/manifests/{reference}")
}

/// A GET of a manifest with the Accept header a pull sends.
fn manifest_get(url: &str) -> Command {
    let mut c = bench::get(url);
    c.args(["-H", &format!("Accept: {MANIFEST_MEDIA_TYPE}")]);
    c
}

/// CNCF distribution in proxy mode (a pull-through cache) in front of `upstream`.
async fn distribution_proxy(upstream: &str) -> Registry {
    Registry::start(RegistryOptions::default().with_proxy(upstream, None)).await
}

/// Waits (up to a minute) until distribution's proxy holds `digest` on its own disk: it
/// stores a blob in the background, after the GET that asked for it has been answered.
async fn distribution_holds(proxy: &Registry, digest: &str) {
    let hex = &digest["sha256:".len()..];
    let data = proxy.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let there = support::wait_until(Duration::from_secs(60), || {
        let exists = data.exists();
        async move { exists }
    })
    .await;
    assert!(there, "distribution's proxy never stored {digest}");
}

/// berth serving its pull API over TLS (HTTP/1.1 and HTTP/2 by ALPN) with `cert`.
async fn tls_berth(upstream: &str, cert: &SelfSigned) -> Berth {
    let extra = Extra {
        server: cert.server_lines(),
        ..Extra::default()
    };
    Berth::start_opts(&[UpstreamSpec::docker_hub(upstream)], &extra).await
}

/// A pull-through proxy under test, started fresh on an upstream. (A few per run: their
/// sizes do not matter.)
#[allow(clippy::large_enum_variant)]
enum Proxy {
    Berth(Berth),
    Distribution(Registry),
}

impl Proxy {
    const NAMES: [&'static str; 2] = ["berth", "distribution"];

    async fn start(name: &str, upstream: &str) -> Proxy {
        match name {
            "berth" => Proxy::Berth(Berth::start(&[UpstreamSpec::docker_hub(upstream)]).await),
            _ => Proxy::Distribution(distribution_proxy(upstream).await),
        }
    }

    fn url(&self) -> String {
        match self {
            Proxy::Berth(b) => b.url(),
            Proxy::Distribution(r) => r.url(),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Proxy::Berth(b) => b.pid(),
            Proxy::Distribution(r) => r.pid(),
        }
        .expect("the proxy runs")
    }
}

/// `a / b` (two significant digits below 0.1), or a dash when `b` is nothing (a CPU
/// delta under one clock tick).
fn ratio(a: f64, b: f64) -> String {
    match a / b {
        r if !(b > 0.0 && r.is_finite()) => "–".to_owned(),
        r if r > 0.0 && r < 0.1 => format!("{r:.*}", (1.0 - r.log10().floor()) as usize),
        r => format!("{r:.2}"),
    }
}

/// A server in a throughput or rate table: where the content is, how curl reaches it
/// (transport options), and whose CPU counts.
#[derive(Clone)]
struct Target {
    label: String,
    url: String,
    curl_args: Vec<String>,
    /// Request header lines (`Name: value`) every client sends: curl and wrk alike.
    headers: Vec<String>,
    /// The HTTP version curl must have spoken (`1.1`, `2`), when it is not left to it.
    version: Option<&'static str>,
    pid: u32,
}

impl Target {
    fn new(label: &str, url: String, pid: Option<u32>) -> Target {
        Target {
            label: label.to_owned(),
            url,
            curl_args: Vec::new(),
            headers: Vec::new(),
            version: None,
            pid: pid.expect("the server runs"),
        }
    }

    fn with(mut self, args: Vec<String>) -> Target {
        self.curl_args.extend(args);
        self
    }

    /// With a request header (`Name: value`) on every request, curl's and wrk's.
    fn header(mut self, line: String) -> Target {
        self.curl_args.extend(["-H".to_owned(), line.clone()]);
        self.headers.push(line);
        self
    }

    /// Over a given HTTP version: `flag` asks curl for it, and the answer is checked.
    fn over(mut self, flag: &str, version: &'static str) -> Target {
        self.curl_args.push(flag.to_owned());
        self.version = Some(version);
        self
    }

    fn get(&self) -> Command {
        let mut c = bench::get(&self.url);
        c.args(&self.curl_args);
        c
    }
}

/// What serves one file (a blob, a manifest) in the warm tables: berth (plain and TLS) and
/// distribution's proxy, all on the same upstream, and nginx serving a copy of the file
/// (plain HTTP/1.1, h2c and TLS).
struct Servers {
    berth: Berth,
    berth_tls: Berth,
    distribution: Registry,
    nginx: Nginx,
    cert: SelfSigned,
    _root: tempfile::TempDir,
}

impl Servers {
    /// Starts them; nginx serves `img`'s blob `digest` (a manifest is one too) as `/file`.
    async fn start(registry: &Registry, img: &BuiltImage, digest: &str) -> Servers {
        let cert = SelfSigned::new();
        let root = tempfile::tempdir().expect("nginx root");
        std::fs::copy(img.blob_path(digest), root.path().join("file")).expect("copy the file");
        Servers {
            berth: Berth::start(&[UpstreamSpec::docker_hub(&registry.url())]).await,
            berth_tls: tls_berth(&registry.url(), &cert).await,
            distribution: distribution_proxy(&registry.url()).await,
            nginx: Nginx::start_with(root.path(), Some(&cert)),
            cert,
            _root: root,
        }
    }

    /// `path` (`/v2/…`) through berth over plain HTTP.
    fn berth(&self, label: &str, path: &str) -> Target {
        Target::new(
            label,
            format!("{}{path}", self.berth.url()),
            self.berth.pid(),
        )
    }

    /// `path` through berth over TLS.
    fn berth_tls(&self, label: &str, path: &str) -> Target {
        let url = format!("https://{}{path}", self.berth_tls.addr);
        Target::new(label, url, self.berth_tls.pid()).with(self.cert.curl_args())
    }

    fn distribution(&self, label: &str, path: &str) -> Target {
        let url = format!("{}{path}", self.distribution.url());
        Target::new(label, url, self.distribution.pid())
    }

    /// The file from nginx over plain HTTP/1.1 (sendfile).
    fn nginx(&self, label: &str) -> Target {
        Target::new(label, self.nginx.url("file"), Some(self.nginx.pid()))
    }

    /// The file from nginx's h2c port (HTTP/2 with prior knowledge only).
    fn nginx_h2c(&self, label: &str) -> Target {
        let url = format!("http://127.0.0.1:{}/file", self.nginx.h2c_port);
        Target::new(label, url, Some(self.nginx.pid()))
    }

    fn nginx_tls(&self, label: &str) -> Target {
        let port = self.nginx.tls_port.expect("nginx serves TLS");
        let url = format!("https://127.0.0.1:{port}/file");
        Target::new(label, url, Some(self.nginx.pid())).with(self.cert.curl_args())
    }
}

// ---------------------------------------------------------------------------------------
// Warm blobs: curl clients, bytes and CPU.

#[derive(Clone, Copy)]
struct Sample {
    mibps: f64,
    cpu_per_gib: f64,
}

impl Sample {
    /// Table cells: MiB/s, its ratio to `reference`'s, CPU s per GiB, its ratio.
    fn cells(&self, reference: &Sample) -> String {
        format!(
            "{:.0} | {} | {:.2} | {}",
            self.mibps,
            ratio(self.mibps, reference.mibps),
            self.cpu_per_gib,
            ratio(self.cpu_per_gib, reference.cpu_per_gib)
        )
    }
}

/// `clients` curls at once at `t`, each checked for `size` bytes. MiB/s: all the bytes
/// over the slowest curl's own time (process start-up aside).
async fn sample(t: &Target, clients: usize, size: u64) -> Sample {
    let cpu0 = bench::cpu_secs(t.pid);
    let (got, _) = bench::get_all((0..clients).map(|_| t.get()).collect()).await;
    let cpu = bench::cpu_secs(t.pid) - cpu0;
    for g in &got {
        assert_eq!(g.bytes, size, "{}: short body {g:?}", t.label);
        if let Some(v) = t.version {
            assert_eq!(g.version, v, "{}: not over HTTP/{v}: {g:?}", t.label);
        }
    }
    let bytes: u64 = got.iter().map(|g| g.bytes).sum();
    let secs = bench::max(&got.iter().map(|g| g.secs).collect::<Vec<_>>());
    Sample {
        mibps: bench::mibps(bytes, secs),
        cpu_per_gib: cpu / (bytes as f64 / GIB),
    }
}

/// The median sample of each target over `rounds`; the targets take turns within a round,
/// so that what else the machine does weighs on each alike.
async fn medians(targets: &[Target], clients: usize, size: u64, rounds: usize) -> Vec<Sample> {
    let mut all = vec![Vec::new(); targets.len()];
    for _ in 0..rounds {
        for (t, v) in targets.iter().zip(&mut all) {
            v.push(sample(t, clients, size).await);
        }
    }
    all.into_iter()
        .map(|v| Sample {
            mibps: median(v.iter().map(|s| s.mibps).collect()),
            cpu_per_gib: median(v.iter().map(|s| s.cpu_per_gib).collect()),
        })
        .collect()
}

async fn bench_pull() {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(RegistryOptions::default()).await;
    let big = push_image(&registry, dir.path(), "library/big", &[blob_mib * MIB], 1).await;
    let (digest, size) = big.layers[0].clone();
    {
        let servers = Servers::start(&registry, &big, &digest).await;
        // Each proxy fetches the blob once, fully, before any round.
        let path = format!("/v2/library/big/blobs/{digest}");
        for proxy in [
            servers.berth("", &path),
            servers.berth_tls("", &path),
            servers.distribution("", &path),
        ] {
            sample(&proxy, 1, size).await;
        }
        distribution_holds(&servers.distribution, &digest).await;
        bench_warm(&servers, &path, size, rounds).await;
        bench_transports(&servers, &path, size, rounds).await;
    }
    bench_cold_pull(&registry, dir.path(), rounds).await;
}

/// The cold pull alone (`cargo bench --bench e2e -- cold`).
async fn bench_cold() {
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(RegistryOptions::default()).await;
    bench_cold_pull(&registry, dir.path(), rounds).await;
}

/// Warm throughput over plain HTTP/1.1: berth and distribution's proxy vs nginx.
async fn bench_warm(servers: &Servers, path: &str, size: u64, rounds: usize) {
    let targets = [
        servers.nginx("nginx (sendfile)"),
        servers.berth("berth", path),
        servers.distribution("distribution's proxy (warm)", path),
    ];
    println!(
        "\n## Warm blob over plain HTTP/1.1, {} MiB ({size} B), curl clients, \
         median of {rounds}\n\n\
         MiB/s: all clients' bytes over the slowest one's time. CPU: utime + stime of the \
         server (nginx: its workers too) per GiB sent. Both against nginx serving the same \
         file, measured in the same rounds.\n",
        size / MIB
    );
    println!("| clients | server | MiB/s | / nginx | CPU s per GiB | CPU / nginx |");
    println!("|---:|---|---:|---:|---:|---:|");
    for clients in [1usize, 4] {
        let s = medians(&targets, clients, size, rounds).await;
        for (t, x) in targets.iter().zip(&s) {
            println!("| {clients} | {} | {} |", t.label, x.cells(&s[0]));
        }
    }
}

/// berth's warm blob over each transport (one curl) vs its plain HTTP/1.1, which sends
/// with sendfile; nginx over the same transports alongside.
async fn bench_transports(servers: &Servers, path: &str, size: u64, rounds: usize) {
    // What curl is asked for, the HTTP version it must then speak, and whether over TLS.
    let transports = [
        ("plain HTTP/1.1", "--http1.1", "1.1", false),
        (
            "h2c (prior knowledge)",
            "--http2-prior-knowledge",
            "2",
            false,
        ),
        ("TLS, HTTP/1.1", "--http1.1", "1.1", true),
        ("TLS, HTTP/2 (ALPN)", "--http2", "2", true),
    ];
    let mut targets = Vec::new();
    for (label, flag, version, tls) in transports {
        let (berth, nginx) = match (tls, version) {
            (true, _) => (servers.berth_tls(label, path), servers.nginx_tls("")),
            (false, "2") => (servers.berth(label, path), servers.nginx_h2c("")),
            (false, _) => (servers.berth(label, path), servers.nginx("")),
        };
        targets.extend([berth.over(flag, version), nginx.over(flag, version)]);
    }
    let s = medians(&targets, 1, size, rounds).await;
    println!(
        "\n## berth's warm blob by transport, {} MiB, 1 curl client, median of {rounds}\n\n\
         Ratios against berth's plain HTTP/1.1 (sendfile) in the same rounds; nginx serving \
         the same file over the same transport alongside. TLS: a self-signed P-256 \
         certificate, curl --cacert. CPU: utime + stime per GiB sent.\n",
        size / MIB
    );
    println!(
        "| transport | berth MiB/s | / plain HTTP/1.1 | berth CPU s per GiB | CPU / plain HTTP/1.1 \
         | nginx MiB/s | berth / nginx | nginx CPU s per GiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (pair, t) in s.chunks(2).zip(targets.iter().step_by(2)) {
        let (b, n) = (pair[0], pair[1]);
        println!(
            "| {} | {} | {:.0} | {} | {:.2} |",
            t.label,
            b.cells(&s[0]),
            n.mibps,
            ratio(b.mibps, n.mibps),
            n.cpu_per_gib,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Cold pulls.

/// What `ctr pull` fetches, each by its own curl: the manifest, then the config and the
/// layers all at once. Checks every size; returns the seconds until the last byte.
async fn pull_image(base: &str, repo: &str, img: &BuiltImage) -> f64 {
    let started = Instant::now();
    let (got, _) = bench::get_all(vec![manifest_get(&manifest_url(base, repo, "v1"))]).await;
    assert_eq!(got[0].bytes, img.manifest_size, "manifest from {base}");
    let mut blobs = vec![(img.config_digest.clone(), img.config_size)];
    blobs.extend(img.layers.iter().cloned());
    let cmds = blobs
        .iter()
        .map(|(d, _)| bench::get(&blob_url(base, repo, d)))
        .collect();
    let (got, _) = bench::get_all(cmds).await;
    for (g, (digest, size)) in got.iter().zip(&blobs) {
        assert_eq!(g.bytes, *size, "{digest} from {base}: {g:?}");
    }
    started.elapsed().as_secs_f64()
}

/// Cold pull: fresh proxies each round, against the same upstream as the direct pull: once
/// unlimited (loopback: a proxy's own cost shows), once at a CDN-like rate per connection
/// (what a cluster sees).
async fn bench_cold_pull(registry: &Registry, dir: &Path, rounds: usize) {
    let layers = [50 * MIB, 30 * MIB, 20 * MIB];
    let img = push_image(registry, dir, "library/app", &layers, 2).await;
    let cdn_rate = env_u64("BENCH_CDN_RATE_MIB", 100);
    println!(
        "\n## Cold pull, 3 layers (50 + 30 + 20 MiB), median of {rounds}\n\n\
         A pull as `ctr pull` makes it, every request its own curl: the manifest, then the \
         config and the layers at once. A fresh proxy each round; the reference is the same \
         pull straight from the upstream, in the same round.\n"
    );
    println!(
        "| upstream | direct s | through berth (cold) s | through distribution's proxy (cold) s \
         | berth / direct | distribution / direct |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut berth_cpu = Vec::new();
    for rate in [None, Some(cdn_rate)] {
        // Unlimited: the registry itself (a front in between would spend the same CPU
        // the proxies compete for); limited: the throttling front before it.
        let front = match rate {
            Some(_) => Some(bench::throttled_front(&registry.url(), rate).await),
            None => None,
        };
        let upstream = front.as_ref().map_or_else(|| registry.url(), |f| f.url());
        let mut runs = [Vec::new(), Vec::new(), Vec::new()];
        let mut cpu = Vec::new();
        for _ in 0..rounds {
            runs[0].push(pull_image(&upstream, "library/app", &img).await);
            for (name, v) in Proxy::NAMES.iter().zip(&mut runs[1..]) {
                let proxy = Proxy::start(name, &upstream).await;
                let before = bench::cpu_secs(proxy.pid());
                v.push(pull_image(&proxy.url(), "library/app", &img).await);
                if *name == "berth" {
                    cpu.push(bench::cpu_secs(proxy.pid()) - before);
                }
            }
        }
        let [d, b, x] = runs.map(median);
        let label = rate.map_or("loopback, unlimited".to_owned(), |r| {
            format!("{r} MiB/s per connection")
        });
        println!(
            "| {label} | {d:.3} | {b:.3} | {x:.3} | {} | {} |",
            ratio(b, d),
            ratio(x, d)
        );
        berth_cpu.push((label, median(cpu)));
    }
    println!();
    for (label, cpu) in berth_cpu {
        println!("berth's CPU for the cold pull ({label}): {cpu:.2} s (utime + stime, median)");
    }
}

// ---------------------------------------------------------------------------------------
// Cached manifests: wrk clients, requests per second and CPU per request.

/// Requests per second `wrk` (1 thread, 32 connections) gets from `url` in `secs`, every
/// request with the header lines `headers` (`Name: value`).
fn wrk_rate(url: &str, headers: &[String], secs: u64) -> f64 {
    let mut wrk = Command::new(support::require_tool("wrk"));
    wrk.args(["-t1", "-c32", &format!("-d{secs}s")]);
    for h in headers {
        wrk.args(["-H", h]);
    }
    let out = wrk.arg(url).output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk got errors from {url}:\n{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"))
}

#[derive(Clone, Copy)]
struct Rate {
    per_sec: f64,
    server_us: f64,
    upstream_us: f64,
}

/// One wrk run at `t`: its rate, and the CPU per request of `t`'s server and of `upstream`.
fn rate_sample(t: &Target, upstream: u32, secs: u64) -> Rate {
    let (s0, u0) = (bench::cpu_secs(t.pid), bench::cpu_secs(upstream));
    let mut headers = vec![format!("Accept: {MANIFEST_MEDIA_TYPE}")];
    headers.extend(t.headers.iter().cloned());
    let per_sec = wrk_rate(&t.url, &headers, secs);
    let requests = per_sec * secs as f64;
    Rate {
        per_sec,
        server_us: (bench::cpu_secs(t.pid) - s0) / requests * 1e6,
        upstream_us: (bench::cpu_secs(upstream) - u0) / requests * 1e6,
    }
}

/// The manifest table's rows, each with the row it is compared with (nginx over the same
/// transport): plain HTTP first, then TLS.
fn manifest_rows(servers: &Servers, repo: &str, digest: &str) -> Vec<(Target, usize)> {
    let (tag, by_digest) = (
        format!("/v2/{repo}/manifests/v1"),
        format!("/v2/{repo}/manifests/{digest}"),
    );
    let plain = [
        servers.nginx("nginx (file)"),
        servers.berth("berth by tag", &tag),
        servers.berth("berth by digest", &by_digest),
        servers.distribution("distribution's proxy by tag", &tag),
        servers.distribution("distribution's proxy by digest", &by_digest),
    ];
    let tls = [
        servers.nginx_tls("nginx (file) over TLS"),
        servers.berth_tls("berth by digest over TLS", &by_digest),
    ];
    let n = plain.len();
    let plain = plain.into_iter().map(|t| (t, 0));
    plain.chain(tls.into_iter().map(|t| (t, n))).collect()
}

async fn bench_manifest() {
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let secs = env_u64("BENCH_SECS", 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(RegistryOptions::default()).await;
    let img = push_image(&registry, dir.path(), "library/small", &[4096], 3).await;
    let servers = Servers::start(&registry, &img, &img.manifest_digest).await;
    let rows = manifest_rows(&servers, "library/small", &img.manifest_digest);
    // One GET of each first, so that the proxies hold the manifest.
    for (t, _) in &rows {
        let mut cmd = manifest_get(&t.url);
        cmd.args(&t.curl_args);
        let (got, _) = bench::get_all(vec![cmd]).await;
        assert_eq!(got[0].bytes, img.manifest_size, "{}: {:?}", t.label, got[0]);
    }
    let upstream = registry.pid().expect("registry runs");
    let mut all = vec![Vec::new(); rows.len()];
    for _ in 0..rounds {
        for ((t, _), v) in rows.iter().zip(&mut all) {
            v.push(rate_sample(t, upstream, secs));
        }
    }
    let m: Vec<Rate> = all
        .into_iter()
        .map(|v| Rate {
            per_sec: median(v.iter().map(|r| r.per_sec).collect()),
            server_us: median(v.iter().map(|r| r.server_us).collect()),
            upstream_us: median(v.iter().map(|r| r.upstream_us).collect()),
        })
        .collect();
    print_manifest_table(&rows, &m, img.manifest.len(), secs, rounds);
}

fn print_manifest_table(
    rows: &[(Target, usize)],
    m: &[Rate],
    size: usize,
    secs: u64,
    rounds: usize,
) {
    println!(
        "\n## Cached manifest ({size} B), wrk -t1 -c32 -d{secs}s, median of {rounds}\n\n\
         Against nginx serving the same bytes as a file over the same transport, in the same \
         rounds. CPU per request: utime + stime of the server (nginx: its workers too), and \
         of the registry behind the proxies. distribution's proxy asks that registry for the \
         tag on every request by tag: its behaviour, reported as it is.\n"
    );
    println!(
        "| path | req/s | / nginx, same transport | server CPU µs per request \
         | upstream registry CPU µs per request |"
    );
    println!("|---|---:|---:|---:|---:|");
    for ((t, reference), x) in rows.iter().zip(m) {
        println!(
            "| {} | {:.0} | {} | {:.0} | {:.0} |",
            t.label,
            x.per_sec,
            ratio(x.per_sec, m[*reference].per_sec),
            x.server_us,
            x.upstream_us
        );
    }
}

// ---------------------------------------------------------------------------------------
// Authentication and access rules on the hottest path: a cached manifest by tag.

/// The principal of the `access` rows: a token file's name and an htpasswd user.
const PRINCIPAL: &str = "bench";
/// Its token, shaped like `openssl rand -hex 32`.
const TOKEN: &str = "5f0c2b7e9a4d61c38e2f7b0a9d4c6e1f3a8b5d7c9e0f2a4b6c8d0e2f4a6b8c0d";
/// Its htpasswd password, and the bcrypt cost it is stored with.
const PASSWORD: &str = "bench-password-8d1e";
const BCRYPT_COST: u32 = 10;
/// How many `[[access]]` rules the rules row has.
const RULES: usize = 20;

/// `n` `[[access]]` rules, every one for `principal`: the first `n - 1` with two patterns
/// each that do not match the benchmark's repository, the last with `allowed`, which does.
/// A request is checked against every pattern before the one that lets it through.
fn access_rules(n: usize, principal: &str, allowed: &str) -> String {
    let mut toml = String::new();
    for i in 1..n {
        toml.push_str(&format!(
            "\n[[access]]\nprincipals = [\"team-{i:02}\", \"{principal}\"]\n\
             repositories = [\"docker.io/team-{i:02}/*\", \"docker.io/team-{i:02}-tools/**\"]\n"
        ));
    }
    toml.push_str(&format!(
        "\n[[access]]\nprincipals = [\"{principal}\"]\nrepositories = [\"{allowed}\"]\n"
    ));
    toml
}

/// The `access` rows: berth's configuration (top-level TOML) and the credentials header
/// its clients send. The first row is the reference.
fn access_configs(dir: &Path) -> Vec<(String, String, Option<String>)> {
    let tokens = support::auth::tokens_dir(dir, &[(PRINCIPAL, TOKEN)]);
    let htpasswd = support::auth::htpasswd_file(dir, &[(PRINCIPAL, PASSWORD)], BCRYPT_COST);
    let tokens_auth = format!(
        "[auth]\ntokens_dir = \"{}\"\nanonymous = false\n",
        tokens.display()
    );
    let htpasswd_auth = format!(
        "[auth]\nhtpasswd = \"{}\"\nanonymous = false\n",
        htpasswd.display()
    );
    let bearer = bench::bearer_header(TOKEN);
    vec![
        ("no [auth] (reference)".to_owned(), String::new(), None),
        (
            "[auth] tokens_dir, a Bearer token on every request".to_owned(),
            tokens_auth.clone(),
            Some(bearer.clone()),
        ),
        (
            format!("[auth] htpasswd (bcrypt cost {BCRYPT_COST}), Basic on every request"),
            htpasswd_auth,
            Some(bench::basic_header(PRINCIPAL, PASSWORD)),
        ),
        (
            format!("tokens_dir + Bearer, {RULES} [[access]] rules, the last one matching"),
            tokens_auth + &access_rules(RULES, PRINCIPAL, "docker.io/library/*"),
            Some(bearer),
        ),
    ]
}

async fn bench_access() {
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let secs = env_u64("BENCH_SECS", 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(RegistryOptions::default()).await;
    let repo = "library/small";
    let img = push_image(&registry, dir.path(), repo, &[4096], 3).await;
    let accept = format!("Accept: {MANIFEST_MEDIA_TYPE}");
    let mut berths = Vec::new();
    let mut rows = Vec::new();
    for (label, top, credentials) in access_configs(dir.path()) {
        let berth = Berth::start_with(&[UpstreamSpec::docker_hub(&registry.url())], &top).await;
        let mut t = Target::new(&label, manifest_url(&berth.url(), repo, "v1"), berth.pid());
        if let Some(line) = credentials {
            t = t.header(line);
        }
        // One GET with the credentials first: the manifest into this berth's cache, and
        // the htpasswd row's one bcrypt check (later requests hit the verified cache).
        let mut cmd = manifest_get(&t.url);
        cmd.args(&t.curl_args);
        let (got, _) = bench::get_all(vec![cmd]).await;
        assert_eq!(got[0].bytes, img.manifest_size, "{label}: {:?}", got[0]);
        // The configuration is in force: no credentials, 401; the rules row refuses a
        // repository no rule allows, 403.
        if !t.headers.is_empty() {
            let status = get_status(&t.url, &[&accept]);
            assert_eq!(
                status, 401,
                "{label}: a GET without credentials got {status}"
            );
        }
        if top.contains("[[access]]") {
            let other = manifest_url(&berth.url(), "someone/else", "v1");
            let status = get_status(&other, &[&accept, &t.headers[0]]);
            assert_eq!(
                status, 403,
                "{label}: a repository no rule allows got {status}"
            );
        }
        berths.push(berth);
        rows.push(t);
    }
    let upstream = registry.pid().expect("registry runs");
    let mut all = vec![Vec::new(); rows.len()];
    for _ in 0..rounds {
        for (t, v) in rows.iter().zip(&mut all) {
            v.push(rate_sample(t, upstream, secs));
        }
    }
    print_access_table(&rows, &all, img.manifest.len(), secs, rounds);
}

fn print_access_table(rows: &[Target], all: &[Vec<Rate>], size: usize, secs: u64, rounds: usize) {
    println!(
        "\n## Authentication and access rules: cached manifest ({size} B) by tag, \
         wrk -t1 -c32 -d{secs}s, median of {rounds}\n\n\
         One berth per configuration on the same upstream, each holding the manifest; every \
         ratio is against berth without [auth], measured in the same rounds. CPU per \
         request: berth's utime + stime. The range is the ratio's, round by round.\n"
    );
    println!(
        "| berth configuration | req/s | / no auth | server CPU µs per request \
         | CPU / no auth | CPU / no auth, range of rounds |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let per_sec = |v: &[Rate]| median(v.iter().map(|r| r.per_sec).collect());
    let cpu = |v: &[Rate]| median(v.iter().map(|r| r.server_us).collect());
    let (base_rate, base_cpu) = (per_sec(&all[0]), cpu(&all[0]));
    for (t, v) in rows.iter().zip(all) {
        let by_round: Vec<f64> = v
            .iter()
            .zip(&all[0])
            .map(|(x, b)| x.server_us / b.server_us)
            .collect();
        let lo = by_round.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {} | {:.0} | {} | {:.1} | {} | {lo:.2}–{:.2} |",
            t.label,
            per_sec(v),
            ratio(per_sec(v), base_rate),
            cpu(v),
            ratio(cpu(v), base_cpu),
            bench::max(&by_round),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Herd.

/// N curls at once, cold, through a fresh `proxy` behind a fresh throttled front. Returns
/// wall seconds, upstream bytes (in blobs) and the proxy's peak RSS.
async fn herd_once(
    proxy: &str,
    registry: &Registry,
    (digest, size): &(String, u64),
    n: usize,
    rate_mib: u64,
) -> (f64, f64, f64) {
    let front = bench::throttled_front(&registry.url(), Some(rate_mib)).await;
    let proxy = Proxy::start(proxy, &front.url()).await;
    let url = blob_url(&proxy.url(), "library/big", digest);
    let (got, wall) = bench::get_all((0..n).map(|_| bench::get(&url)).collect()).await;
    for g in &got {
        assert_eq!(g.bytes, *size, "N={n}: short body {g:?}");
    }
    let up = front.bytes("GET", digest) as f64 / *size as f64;
    (wall.as_secs_f64(), up, bench::peak_rss_mib(proxy.pid()))
}

async fn bench_herd() {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rate_mib = env_u64("BENCH_RATE_MIB", 10);
    let ns = bench::env_list("BENCH_N", "1,10,50,200");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(RegistryOptions::default()).await;
    let img = push_image(&registry, dir.path(), "library/big", &[blob_mib * MIB], 3).await;
    println!(
        "\n## Herd: N concurrent cold pulls (curl processes) of one {blob_mib} MiB blob, \
         upstream {rate_mib} MiB/s per connection\n"
    );
    println!("| proxy | N | upstream bytes (x blob) | wall s | wall / wall(N=1) | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    for proxy in Proxy::NAMES {
        let mut base_wall = None;
        for &n in &ns {
            let (w, up, rss) = herd_once(proxy, &registry, &img.layers[0], n, rate_mib).await;
            let base = *base_wall.get_or_insert(w);
            println!(
                "| {proxy} | {n} | {up:.2} | {w:.1} | {:.2} | {rss:.0} |",
                w / base
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The rate-limit demo (in-process clients: it counts requests, it times nothing).

/// Runs one curl (an external client, as every client here) and returns its stdout.
fn curl_out(args: &[&str]) -> String {
    let out = bench::curl().args(args).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A response's status and one header, from `curl -I` (headers on stdout).
fn head(url: &str, headers: &[&str], name: &str) -> (u16, Option<String>) {
    let mut args = vec!["-I"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let text = curl_out(&args);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let value = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    });
    (status, value)
}

/// The status of a GET whose body is thrown away.
fn get_status(url: &str, headers: &[&str]) -> u16 {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    curl_out(&args).trim().parse().unwrap_or(0)
}

/// One kubelet-style pull straight at Docker Hub: token, HEAD the tag (free), GET the
/// manifest by digest (counted). Returns the GET's status. Blocking (curl processes).
fn pull_direct(hub_url: &str, repo: &str) -> u16 {
    let token = curl_out(&[&format!(
        "{hub_url}/token?service=registry.docker.io&scope=repository:{repo}:pull"
    )]);
    let token: serde_json::Value = serde_json::from_str(&token).unwrap_or_default();
    let auth = format!(
        "Authorization: Bearer {}",
        token["token"].as_str().unwrap_or_default()
    );
    let accept = format!("Accept: {}", support::image::MANIFEST_MEDIA_TYPE);
    let headers = [auth.as_str(), accept.as_str()];
    let (_, digest) = head(
        &format!("{hub_url}/v2/{repo}/manifests/v1"),
        &headers,
        "docker-content-digest",
    );
    let digest = digest.unwrap_or_default();
    get_status(&format!("{hub_url}/v2/{repo}/manifests/{digest}"), &headers)
}

/// The same pull through berth (containerd's `?ns=docker.io` included).
fn pull_via_berth(berth: &str, repo: &str) -> u16 {
    let accept = format!("Accept: {}", support::image::MANIFEST_MEDIA_TYPE);
    let headers = [accept.as_str()];
    let (status, digest) = head(
        &format!("{berth}/v2/{repo}/manifests/v1?ns=docker.io"),
        &headers,
        "docker-content-digest",
    );
    match digest {
        Some(d) if (200..300).contains(&status) => get_status(
            &format!("{berth}/v2/{repo}/manifests/{d}?ns=docker.io"),
            &headers,
        ),
        _ => status,
    }
}

async fn demo_ratelimit() {
    let limit = env_u64("DEMO_LIMIT", 10) as u32;
    let nodes = env_u64("DEMO_NODES", 20) as usize;
    let images = ["library/nginx", "library/redis", "library/postgres"];
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(RegistryOptions::default()).await;
    for (i, repo) in images.iter().enumerate() {
        push_image(&registry, dir.path(), repo, &[64 * 1024], 40 + i as u64).await;
    }
    let attempts = nodes * images.len();
    println!(
        "\n## A rollout: {nodes} nodes pull {} images ({attempts} pulls); the upstream allows {limit} manifest GETs per window\n",
        images.len()
    );
    println!("| path | pulls attempted | succeeded | failed (429) | counted upstream | 429s sent by upstream |");
    println!("|---|---:|---:|---:|---:|---:|");
    for via_berth in [false, true] {
        let front = Front::start(&registry.url()).await;
        let hub = front.enable_hub(support::hub::HubRules::new(
            limit,
            Duration::from_secs(6 * 3600),
        ));
        let berth = if via_berth {
            Some(Berth::start(&[UpstreamSpec::docker_hub(&front.url())]).await)
        } else {
            None
        };
        let mut tasks = Vec::new();
        for _ in 0..nodes {
            for repo in images {
                let target = berth.as_ref().map_or_else(|| front.url(), |b| b.url());
                tasks.push(tokio::task::spawn_blocking(move || {
                    if via_berth {
                        pull_via_berth(&target, repo)
                    } else {
                        pull_direct(&target, repo)
                    }
                }));
            }
        }
        let (mut ok, mut limited) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                200 => ok += 1,
                429 => limited += 1,
                other => panic!("unexpected status {other}"),
            }
        }
        let path = if via_berth {
            "through berth"
        } else {
            "straight at the upstream"
        };
        println!(
            "| {path} | {attempts} | {ok} | {limited} | {} | {} |",
            hub.counted(),
            hub.refused()
        );
    }
}

#[tokio::main]
async fn main() {
    let Some(which) = support::bench_selection() else {
        println!("e2e benchmarks run under `cargo bench --bench e2e` (scripts/bench*.sh)");
        return;
    };
    let all = which.is_empty();
    // berth as it runs in production (info), not at the test suite's debug level.
    std::env::set_var("BERTH_TEST_LOG", "info");
    bench::describe_machine();
    if all || which.iter().any(|w| w == "pull") {
        bench_pull().await;
    }
    if which.iter().any(|w| w == "cold") {
        bench_cold().await;
    }
    if all || which.iter().any(|w| w == "manifest") {
        bench_manifest().await;
    }
    if all || which.iter().any(|w| w == "access") {
        bench_access().await;
    }
    if all || which.iter().any(|w| w == "herd") {
        bench_herd().await;
    }
    if all || which.iter().any(|w| w == "ratelimit") {
        demo_ratelimit().await;
    }
}
