//! Fleet benchmarks: several berth replicas on one Garage bucket, against real peers,
//! each reference measured in the same run. The clients are `curl` processes; CPU is read
//! from `/proc/<pid>/stat` of the server processes before and after.
//!
//! - `herd`: N concurrent cold GETs of one blob, spread round-robin over three replicas,
//!   behind an upstream limited per connection (a CDN). A fresh registry, bucket and fleet
//!   for every run. Upstream bytes, wall time until every client has the whole blob, when
//!   the blob is in the bucket, peak RSS of the owner and of the other replicas, CPU.
//! - `shared`: a blob the bucket holds, read (a) through a replica with an empty local
//!   tier (bucket → berth → client), and through one with `storage.local = false`,
//!   against (b) the same object straight from Garage through a presigned URL, and
//!   (c) through berth in redirect mode (`curl -L`: a 307, then Garage).
//!
//! Run with `scripts/bench-fleet.sh` (or `cargo bench --bench fleet -- herd|shared`).
//! Knobs: `BENCH_BLOB_MIB` (256), `BENCH_RATE_MIB` (10), `BENCH_N` (`1,30,90`),
//! `BENCH_HERD_ROUNDS` (3), `BENCH_ROUNDS` (5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::berth::{Berth, Extra, UpstreamSpec};
use support::fleet::Fleet;
use support::front::{Faults, Front};
use support::garage::Garage;
use support::image::{build_image, push, BuiltImage, ImageSpec, Platform, LAYOUT_REF};
use support::registry::{Registry, RegistryOptions};

const MIB: u64 = 1024 * 1024;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const PREFIX: &str = "fleet/";
const REPO: &str = "library/big";
/// No client runs longer than this: every load stops by itself.
const CURL_MAX_SECS: &str = "900";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

// ---------------------------------------------------------------------------------------
// What the machine and the processes spent.

/// `sysconf(_SC_CLK_TCK)`: the unit of utime and stime in /proc.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields of /proc/<pid>/stat after the command name (field 3, the state, is index 0).
fn stat_fields(pid: &str) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// utime + stime of a process (every thread), in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let f = stat_fields(&pid.to_string());
    if f.len() < 13 {
        return f64::NAN;
    }
    (f[11] + f[12]) as f64 / clock_ticks()
}

/// This process (the in-process upstream front runs here) and the children it has waited
/// for (the curl clients, sha256sum, skopeo), in seconds.
fn self_and_children_cpu() -> f64 {
    let f = stat_fields("self");
    (f[11] + f[12] + f[13] + f[14]) as f64 / clock_ticks()
}

/// Busy CPU seconds of the whole machine so far (every core), from /proc/stat.
fn machine_busy() -> f64 {
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// CPU seconds of the machine, of the processes named, and of this process with its
/// waited-for children, at one moment: the difference of two says what else ran.
struct Spent {
    machine: f64,
    ours: f64,
}

impl Spent {
    fn now(pids: &[u32]) -> Spent {
        Spent {
            machine: machine_busy(),
            ours: pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() + self_and_children_cpu(),
        }
    }

    /// CPU seconds spent by processes outside the benchmark between `self` and `later`.
    fn others(&self, later: &Spent) -> f64 {
        ((later.machine - self.machine) - (later.ours - self.ours)).max(0.0)
    }
}

// ---------------------------------------------------------------------------------------
// curl, the client.

fn curl() -> Command {
    let mut c = Command::new(support::require_tool("curl"));
    c.args(["-sS", "--noproxy", "*", "--max-time", CURL_MAX_SECS]);
    c
}

/// What `-w` reports, on stdout (or stderr when the body goes to stdout); curl turns
/// the `\n` at the end into a newline.
const WRITE_OUT: &str =
    "%{http_code} %{size_download} %{time_total} %{num_redirects} %{redirect_url}\\n";

#[derive(Debug)]
struct Got {
    code: u16,
    bytes: u64,
    secs: f64,
    redirects: u32,
    location: String,
    /// `sha256:<hex>` of the body, when it was piped into sha256sum.
    digest: Option<String>,
}

fn parse_write_out(text: &str) -> Option<Got> {
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut f = line.split_whitespace();
    Some(Got {
        code: f.next()?.parse().ok()?,
        bytes: f.next()?.parse().ok()?,
        secs: f.next()?.parse().ok()?,
        redirects: f.next()?.parse().ok()?,
        location: f.next().unwrap_or_default().to_owned(),
        digest: None,
    })
}

/// A GET that throws the body away.
fn get_cmd(url: &str, follow: bool) -> Command {
    let mut c = curl();
    if follow {
        c.arg("-L");
    }
    c.args(["-H", &format!("accept: {ACCEPT}"), "-o", "/dev/null", "-w"])
        .arg(WRITE_OUT)
        .arg(url);
    c
}

/// A GET whose body is hashed by `sha256sum` (its own process): the figures go to stderr.
fn hashed_get_cmd(url: &str) -> Command {
    let script = format!(
        "set -o pipefail; '{curl}' -sS --noproxy '*' --max-time {CURL_MAX_SECS} -w '%{{stderr}}{WRITE_OUT}' '{url}' | sha256sum",
        curl = support::require_tool("curl").display(),
    );
    let mut c = Command::new("bash");
    c.arg("-c").arg(script);
    c
}

fn parse_output(out: &Output, hashed: bool) -> Got {
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
/// the last one exited. Blocking: call from `spawn_blocking`.
fn run_all(cmds: Vec<Command>) -> (Vec<Output>, Duration) {
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

/// One curl, waited for on a blocking thread.
async fn run_one(cmd: Command) -> Got {
    let (mut out, _) = tokio::task::spawn_blocking(move || run_all(vec![cmd]))
        .await
        .expect("client thread");
    parse_output(&out.remove(0), false)
}

/// GETs the image manifest through `base`, so that the replica knows the repository.
async fn get_manifest(base: &str) {
    let got = run_one(get_cmd(
        &format!("{base}/v2/{REPO}/manifests/v1?ns=docker.io"),
        false,
    ))
    .await;
    assert_eq!(got.code, 200, "manifest through {base}: {got:?}");
}

fn blob_url(base: &str, digest: &str) -> String {
    format!("{base}/v2/{REPO}/blobs/{digest}?ns=docker.io")
}

// ---------------------------------------------------------------------------------------
// Peers.

/// A fresh registry holding the image as `library/big:v1`.
async fn registry_with(img: &BuiltImage) -> Registry {
    let registry = Registry::start(RegistryOptions::default()).await;
    push(
        &img.layout,
        LAYOUT_REF,
        &format!("{}/{REPO}:v1", registry.host()),
        None,
    )
    .await;
    registry
}

async fn in_bucket(garage: &Garage, digest: &str) -> bool {
    garage
        .object_keys(&format!("{PREFIX}blobs/"))
        .await
        .iter()
        .any(|k| k.ends_with(&digest[7..]))
}

fn build(dir: &Path, blob_mib: u64, seed: u64) -> BuiltImage {
    let spec = ImageSpec {
        layer_sizes: vec![(blob_mib * MIB) as usize],
        seed,
    };
    build_image(
        &dir.join(format!("img-{seed}")),
        &spec,
        Platform::LINUX_AMD64,
    )
}

// ---------------------------------------------------------------------------------------
// Herd across replicas.

struct HerdRun {
    up: f64,
    wall: f64,
    bucket_at: Option<f64>,
    rss_owner: f64,
    rss_others: f64,
    fleet_cpu: f64,
    garage_cpu: f64,
    others_cpu: f64,
}

async fn herd_once(img: &BuiltImage, n: usize, rate_mib: u64) -> HerdRun {
    let (digest, size) = img.layers[0].clone();
    let registry = registry_with(img).await;
    let front = Front::start(&registry.url()).await;
    let garage = Garage::start().await;
    let fleet = Fleet::start(
        3,
        &UpstreamSpec::docker_hub(&front.url()),
        &garage.shared_toml(PREFIX),
        "",
    )
    .await;
    for r in &fleet.replicas {
        get_manifest(&r.url()).await;
    }
    front.set_faults(Faults {
        throttle: Some(rate_mib * MIB),
        ..Faults::default()
    });
    let owner = fleet.owner_of(&digest);
    let fleet_pids: Vec<u32> = fleet.replicas.iter().filter_map(Berth::pid).collect();
    let garage_pid = garage.pid().expect("garage runs");
    let mut all_pids = fleet_pids.clone();
    all_pids.extend([garage_pid, registry.pid().expect("registry runs")]);
    // The first client of each replica hashes its body; the rest count bytes.
    let cmds: Vec<Command> = (0..n)
        .map(|i| {
            let url = blob_url(&fleet.replicas[i % 3].url(), &digest);
            if i < 3 {
                hashed_get_cmd(&url)
            } else {
                get_cmd(&url, false)
            }
        })
        .collect();
    let fleet_cpu0: f64 = fleet_pids.iter().map(|p| cpu_secs(*p)).sum();
    let garage_cpu0 = cpu_secs(garage_pid);
    let spent0 = Spent::now(&all_pids);
    let started = Instant::now();
    let clients = tokio::task::spawn_blocking(move || run_all(cmds));
    // Meanwhile: when does the bucket hold the blob (the owner's upload completed)? Up to
    // 2 minutes after the clients are done.
    let bucket_at = {
        let limit = Duration::from_secs(900 + 120); // CURL_MAX_SECS, then 2 minutes
        let there = support::wait_until(limit, || in_bucket(&garage, &digest)).await;
        there.then(|| started.elapsed().as_secs_f64())
    };
    let (outputs, wall) = clients.await.expect("clients");
    // CPU up to the moment the last client finished would be tighter; the bucket wait adds
    // only the tail of the owner's upload, which belongs to the cost of the fill anyway.
    let spent1 = Spent::now(&all_pids);
    let fleet_cpu1: f64 = fleet_pids.iter().map(|p| cpu_secs(*p)).sum();
    for (i, out) in outputs.iter().enumerate() {
        let got = parse_output(out, i < 3);
        assert_eq!(got.code, 200, "client {i}: {got:?}");
        assert_eq!(got.bytes, size, "client {i}: short body {got:?}");
        if let Some(d) = &got.digest {
            assert_eq!(d, &digest, "client {i}: the body hashed wrong");
        }
    }
    let rss: Vec<f64> = fleet_pids.iter().map(|p| peak_rss_mib(*p)).collect();
    let rss_others = max(&rss
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
        .map(|(_, r)| *r)
        .collect::<Vec<_>>());
    HerdRun {
        up: front.bytes("GET", &digest) as f64 / size as f64,
        wall: wall.as_secs_f64(),
        bucket_at,
        rss_owner: rss[owner],
        rss_others,
        fleet_cpu: fleet_cpu1 - fleet_cpu0,
        garage_cpu: cpu_secs(garage_pid) - garage_cpu0,
        others_cpu: spent0.others(&spent1),
    }
}

/// One client straight at the throttled upstream: what the herd cannot beat.
async fn direct_once(img: &BuiltImage, rate_mib: u64) -> f64 {
    let (digest, size) = img.layers[0].clone();
    let registry = registry_with(img).await;
    let front = Front::start(&registry.url()).await;
    front.set_faults(Faults {
        throttle: Some(rate_mib * MIB),
        ..Faults::default()
    });
    let got = run_one(get_cmd(
        &format!("{}/v2/{REPO}/blobs/{digest}", front.url()),
        false,
    ))
    .await;
    assert_eq!((got.code, got.bytes), (200, size), "{got:?}");
    got.secs
}

async fn bench_herd(img: &BuiltImage) {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rate_mib = env_u64("BENCH_RATE_MIB", 10);
    let rounds = env_u64("BENCH_HERD_ROUNDS", 3).max(1) as usize;
    let ns: Vec<usize> = std::env::var("BENCH_N")
        .unwrap_or_else(|_| "1,30,90".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    println!(
        "\n## Herd across a fleet: N concurrent cold GETs of one {blob_mib} MiB blob over 3 replicas, \
         upstream {rate_mib} MiB/s per connection, median of {rounds} (load before: {})\n",
        loadavg()
    );
    let direct = direct_once(img, rate_mib).await;
    println!("One client straight at the upstream (the floor): {direct:.1} s\n");
    println!(
        "| N | upstream bytes (x blob, max) | wall s | wall / wall(N=1) | in bucket after s | \
         peak RSS MiB, owner | peak RSS MiB, other replicas (max) | fleet CPU s | Garage CPU s | other processes' CPU s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut base = None;
    for &n in &ns {
        let mut runs = Vec::new();
        for _ in 0..rounds {
            runs.push(herd_once(img, n, rate_mib).await);
        }
        let col = |f: &dyn Fn(&HerdRun) -> f64| median(runs.iter().map(f).collect());
        let up = max(&runs.iter().map(|r| r.up).collect::<Vec<_>>());
        let wall = col(&|r| r.wall);
        let base = *base.get_or_insert(wall);
        let bucket = if runs.iter().all(|r| r.bucket_at.is_some()) {
            format!("{:.1}", col(&|r| r.bucket_at.unwrap_or(f64::NAN)))
        } else {
            "never (120 s after the clients)".to_owned()
        };
        println!(
            "| {n} | {up:.2} | {wall:.1} | {:.2} | {bucket} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            wall / base,
            max(&runs.iter().map(|r| r.rss_owner).collect::<Vec<_>>()),
            max(&runs.iter().map(|r| r.rss_others).collect::<Vec<_>>()),
            col(&|r| r.fleet_cpu),
            col(&|r| r.garage_cpu),
            col(&|r| r.others_cpu),
        );
    }
    println!("\n(load after: {})", loadavg());
}

// ---------------------------------------------------------------------------------------
// A blob the bucket holds, read three ways.

struct Sample {
    mibps: f64,
    berth_cpu_per_gib: f64,
    garage_cpu_per_gib: f64,
    /// How busy the whole machine was during the GET, as a share of all its cores.
    machine_busy: f64,
}

/// Runs one GET (timed by curl) while reading the CPU of `berth` (if any) and Garage.
async fn measured(cmd: Command, size: u64, berth: Option<u32>, garage: u32) -> (Got, Sample) {
    let b0 = berth.map(cpu_secs);
    let g0 = cpu_secs(garage);
    let m0 = machine_busy();
    let started = Instant::now();
    let got = run_one(cmd).await;
    let wall = started.elapsed().as_secs_f64();
    let machine = machine_busy() - m0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let gib = size as f64 / GIB;
    let sample = Sample {
        mibps: got.bytes as f64 / MIB as f64 / got.secs,
        berth_cpu_per_gib: match (berth, b0) {
            (Some(p), Some(b0)) => (cpu_secs(p) - b0) / gib,
            _ => f64::NAN,
        },
        garage_cpu_per_gib: (cpu_secs(garage) - g0) / gib,
        machine_busy: machine / (wall * cores),
    };
    (got, sample)
}

async fn bench_shared(img: &BuiltImage) {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1) as usize;
    let (digest, size) = img.layers[0].clone();
    let registry = registry_with(img).await;
    let front = Front::start(&registry.url()).await;
    let garage = Garage::start().await;
    let garage_pid = garage.pid().expect("garage runs");
    let up = UpstreamSpec::docker_hub(&front.url());
    let shared = garage.shared_toml(PREFIX);
    let start = |more: &str, storage: &str| {
        let extra = Extra {
            top: format!("{shared}{more}\n"),
            storage: storage.to_owned(),
            ..Extra::default()
        };
        let up = up.clone();
        async move { Berth::start_opts(std::slice::from_ref(&up), &extra).await }
    };

    // Into the bucket through one replica, which is then gone.
    {
        let seed = start("", "").await;
        get_manifest(&seed.url()).await;
        let got = run_one(get_cmd(&blob_url(&seed.url(), &digest), false)).await;
        assert_eq!((got.code, got.bytes), (200, size), "{got:?}");
        let there =
            support::wait_until(Duration::from_secs(60), || in_bucket(&garage, &digest)).await;
        assert!(there, "the blob never reached the bucket");
    }
    let redirecting = start("redirect = true\nredirect_ttl = \"1h\"\n", "").await;
    let redirecting_pid = redirecting.pid().expect("berth runs");
    get_manifest(&redirecting.url()).await;
    // A replica that keeps no blob on local disk: every read streams from the bucket.
    let diskless = start("", "local = false").await;
    let diskless_pid = diskless.pid().expect("berth runs");
    get_manifest(&diskless.url()).await;
    front.clear();

    let load_before = loadavg();
    let (mut a, mut local, mut b, mut c, mut nolocal) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut all_pids = vec![garage_pid, redirecting_pid, diskless_pid];
    all_pids.extend(registry.pid());
    let mut others = 0.0;
    let mut from_bucket = 0.0;
    for _ in 0..rounds {
        // (a) A replica that has never seen the blob: an empty local tier.
        let fresh = start("", "").await;
        let fresh_pid = fresh.pid().expect("berth runs");
        get_manifest(&fresh.url()).await;
        let pids = [all_pids.as_slice(), &[fresh_pid]].concat();
        let spent0 = Spent::now(&pids);
        let url = blob_url(&fresh.url(), &digest);
        let (got, s) = measured(get_cmd(&url, false), size, Some(fresh_pid), garage_pid).await;
        assert_eq!((got.code, got.bytes), (200, size), "(a): {got:?}");
        a.push(s);
        from_bucket += fresh
            .metric("berth_shared_requests_total{op=\"get\",result=\"ok\"}")
            .await;
        // The same replica again: now from its own disk.
        let (got, s) = measured(get_cmd(&url, false), size, Some(fresh_pid), garage_pid).await;
        assert_eq!((got.code, got.bytes), (200, size), "local: {got:?}");
        local.push(s);
        others += spent0.others(&Spent::now(&pids));
        drop(fresh);

        let spent0 = Spent::now(&all_pids);
        // (b) The presigned URL berth hands out, fetched straight from Garage.
        let url = blob_url(&redirecting.url(), &digest);
        let redirect = run_one(get_cmd(&url, false)).await;
        assert_eq!(redirect.code, 307, "no redirect: {redirect:?}");
        assert!(
            redirect.location.starts_with(&garage.endpoint),
            "{redirect:?}"
        );
        let (got, s) = measured(get_cmd(&redirect.location, false), size, None, garage_pid).await;
        assert_eq!((got.code, got.bytes), (200, size), "(b): {got:?}");
        b.push(s);
        // (c) curl -L through berth: the 307, then Garage.
        let (got, s) = measured(get_cmd(&url, true), size, Some(redirecting_pid), garage_pid).await;
        assert_eq!(
            (got.code, got.bytes, got.redirects),
            (200, size, 1),
            "(c): {got:?}"
        );
        c.push(s);
        // (a) again, through the replica with `storage.local = false`.
        let url = blob_url(&diskless.url(), &digest);
        let (got, s) = measured(get_cmd(&url, false), size, Some(diskless_pid), garage_pid).await;
        assert_eq!((got.code, got.bytes), (200, size), "local = false: {got:?}");
        nolocal.push(s);
        others += spent0.others(&Spent::now(&all_pids));
    }
    let upstream_bytes = front.bytes("GET", &digest);

    println!(
        "\n## A {blob_mib} MiB blob the bucket holds, read through a replica that does not hold it, \
         median of {rounds} (load before: {load_before}, after: {})\n",
        loadavg()
    );
    println!(
        "| path | MiB/s | / straight from Garage | berth CPU s per GiB | Garage CPU s per GiB | \
         machine busy (all cores) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let reference = median(b.iter().map(|s| s.mibps).collect());
    let row = |label: &str, v: &[Sample]| {
        let m = median(v.iter().map(|s| s.mibps).collect());
        let bc = median(v.iter().map(|s| s.berth_cpu_per_gib).collect());
        let gc = median(v.iter().map(|s| s.garage_cpu_per_gib).collect());
        let busy = median(v.iter().map(|s| s.machine_busy).collect()) * 100.0;
        let bc = if bc.is_nan() {
            "–".to_owned()
        } else {
            format!("{bc:.2}")
        };
        println!(
            "| {label} | {m:.0} | {:.2} | {bc} | {gc:.2} | {busy:.0}% |",
            m / reference
        );
    };
    row("(b) presigned URL, straight from Garage (reference)", &b);
    row(
        "(a) first read through a replica with an empty local tier: bucket → berth → client",
        &a,
    );
    row(
        "(a) through a replica with `storage.local = false`: bucket → berth → client, no local copy",
        &nolocal,
    );
    row(
        "(c) redirect mode, `curl -L` through berth: 307, then Garage",
        &c,
    );
    row(
        "the same replica as (a), read again: its local disk",
        &local,
    );
    println!(
        "\nUpstream blob bytes during these rounds: {upstream_bytes}; objects the fresh replicas \
         read from the bucket: {from_bucket}; CPU used by other processes on the machine during \
         the rounds: {others:.1} s."
    );
}

fn describe_machine() {
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

#[tokio::main]
async fn main() {
    let Some(which) = support::bench_selection() else {
        println!("fleet benchmarks run under `cargo bench --bench fleet` (scripts/bench-fleet.sh)");
        return;
    };
    let all = which.is_empty();
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let dir = tempfile::tempdir().expect("tempdir");
    describe_machine();
    let img = build(dir.path(), blob_mib, 7);
    if all || which.iter().any(|w| w == "herd") {
        bench_herd(&img).await;
    }
    if all || which.iter().any(|w| w == "shared") {
        bench_shared(&img).await;
    }
}
