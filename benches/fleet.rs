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
use std::process::Command;
use std::time::{Duration, Instant};

use support::bench::{
    self, cpu_secs, env_u64, loadavg, machine_busy, max, median, parse_output, peak_rss_mib,
    run_all, run_one, Got, CURL_MAX_SECS, GIB, MIB, WRITE_OUT,
};
use support::berth::{Berth, Extra, UpstreamSpec};
use support::fleet::Fleet;
use support::front::Front;
use support::garage::Garage;
use support::image::{build_image, push, BuiltImage, ImageSpec, Platform, LAYOUT_REF};
use support::registry::{Registry, RegistryOptions};

const PREFIX: &str = "fleet/";
const REPO: &str = "library/big";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

// ---------------------------------------------------------------------------------------
// What the machine and the processes spent.

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
            ours: pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() + bench::self_and_children_cpu(),
        }
    }

    /// CPU seconds spent by processes outside the benchmark between `self` and `later`.
    fn others(&self, later: &Spent) -> f64 {
        ((later.machine - self.machine) - (later.ours - self.ours)).max(0.0)
    }
}

// ---------------------------------------------------------------------------------------
// curl, the client.

/// A GET that throws the body away, accepting any manifest.
fn get_cmd(url: &str, follow: bool) -> Command {
    let mut c = bench::get(url);
    c.args(["-H", &format!("accept: {ACCEPT}")]);
    if follow {
        c.arg("-L");
    }
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

/// Panics unless every herd client got the whole blob (the first three: hashed right).
fn check_herd(outputs: &[std::process::Output], size: u64, digest: &str) {
    for (i, out) in outputs.iter().enumerate() {
        let got = parse_output(out, i < 3);
        assert_eq!(got.code, 200, "client {i}: {got:?}");
        assert_eq!(got.bytes, size, "client {i}: short body {got:?}");
        if let Some(d) = &got.digest {
            assert_eq!(d, digest, "client {i}: the body hashed wrong");
        }
    }
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
    front.set_faults(bench::throttle(Some(rate_mib)));
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
    check_herd(&outputs, size, &digest);
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
    let front = bench::throttled_front(&registry.url(), Some(rate_mib)).await;
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
    let ns = bench::env_list("BENCH_N", "1,30,90");
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
        mibps: bench::mibps(got.bytes, got.secs),
        berth_cpu_per_gib: match (berth, b0) {
            (Some(p), Some(b0)) => (cpu_secs(p) - b0) / gib,
            _ => f64::NAN,
        },
        garage_cpu_per_gib: (cpu_secs(garage) - g0) / gib,
        machine_busy: machine / (wall * cores),
    };
    (got, sample)
}

/// Panics unless `got` is a 200 with the whole blob.
fn assert_whole(got: &Got, size: u64, what: &str) {
    assert_eq!((got.code, got.bytes), (200, size), "{what}: {got:?}");
}

/// The peers of `shared`: an upstream, Garage holding the blob, and the replicas that stay
/// up through the rounds: one in redirect mode, one with `storage.local = false`.
struct SharedPeers {
    registry: Registry,
    front: Front,
    garage: Garage,
    redirecting: Berth,
    diskless: Berth,
}

impl SharedPeers {
    async fn start(img: &BuiltImage) -> SharedPeers {
        let (digest, size) = img.layers[0].clone();
        let registry = registry_with(img).await;
        let front = Front::start(&registry.url()).await;
        let garage = Garage::start().await;
        // Into the bucket through one replica, which is then gone.
        {
            let seed = replica(&front, &garage, "", "").await;
            let got = run_one(get_cmd(&blob_url(&seed.url(), &digest), false)).await;
            assert_whole(&got, size, "seeding the bucket");
            let there =
                support::wait_until(Duration::from_secs(60), || in_bucket(&garage, &digest)).await;
            assert!(there, "the blob never reached the bucket");
        }
        let redirect = "redirect = true\nredirect_ttl = \"1h\"\n";
        let redirecting = replica(&front, &garage, redirect, "").await;
        // A replica that keeps no blob on local disk: every read streams from the bucket.
        let diskless = replica(&front, &garage, "", "local = false").await;
        front.clear();
        SharedPeers {
            registry,
            front,
            garage,
            redirecting,
            diskless,
        }
    }

    /// The processes that run through the rounds.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.garage.pid().expect("garage runs")];
        pids.extend(
            [&self.redirecting, &self.diskless]
                .iter()
                .filter_map(|b| b.pid()),
        );
        pids.extend(self.registry.pid());
        pids
    }
}

/// A replica on the bucket (`more` top-level TOML, `storage` lines in `[storage]`) that
/// has fetched the image manifest.
async fn replica(front: &Front, garage: &Garage, more: &str, storage: &str) -> Berth {
    let extra = Extra {
        top: format!("{}{more}\n", garage.shared_toml(PREFIX)),
        storage: storage.to_owned(),
        ..Extra::default()
    };
    let berth = Berth::start_opts(&[UpstreamSpec::docker_hub(&front.url())], &extra).await;
    get_manifest(&berth.url()).await;
    berth
}

/// What the rounds of `shared` measured, by path, and what else they saw.
#[derive(Default)]
struct SharedRuns {
    fresh: Vec<Sample>,
    local: Vec<Sample>,
    presigned: Vec<Sample>,
    redirected: Vec<Sample>,
    diskless: Vec<Sample>,
    /// CPU seconds other processes on the machine used meanwhile.
    others: f64,
    /// Objects the fresh replicas read from the bucket.
    from_bucket: f64,
}

/// (a) A replica that has never seen the blob (an empty local tier), then the same one
/// again, from its own disk.
async fn fresh_round(peers: &SharedPeers, img: &BuiltImage, runs: &mut SharedRuns) {
    let (digest, size) = img.layers[0].clone();
    let garage = peers.garage.pid().expect("garage runs");
    let fresh = replica(&peers.front, &peers.garage, "", "").await;
    let pid = fresh.pid().expect("berth runs");
    let pids = [peers.pids().as_slice(), &[pid]].concat();
    let spent0 = Spent::now(&pids);
    let url = blob_url(&fresh.url(), &digest);
    let (got, s) = measured(get_cmd(&url, false), size, Some(pid), garage).await;
    assert_whole(&got, size, "(a)");
    runs.fresh.push(s);
    runs.from_bucket += fresh
        .metric("berth_shared_requests_total{op=\"get\",result=\"ok\"}")
        .await;
    let (got, s) = measured(get_cmd(&url, false), size, Some(pid), garage).await;
    assert_whole(&got, size, "local");
    runs.local.push(s);
    runs.others += spent0.others(&Spent::now(&pids));
}

/// (b) the presigned URL straight from Garage, (c) `curl -L` through the redirecting
/// replica, and (a) through the replica with `storage.local = false`.
async fn kept_round(peers: &SharedPeers, img: &BuiltImage, runs: &mut SharedRuns) {
    let (digest, size) = img.layers[0].clone();
    let garage = peers.garage.pid().expect("garage runs");
    let spent0 = Spent::now(&peers.pids());
    let url = blob_url(&peers.redirecting.url(), &digest);
    let redirect = run_one(get_cmd(&url, false)).await;
    assert_eq!(redirect.code, 307, "no redirect: {redirect:?}");
    assert!(
        redirect.location.starts_with(&peers.garage.endpoint),
        "{redirect:?}"
    );
    let (got, s) = measured(get_cmd(&redirect.location, false), size, None, garage).await;
    assert_whole(&got, size, "(b)");
    runs.presigned.push(s);
    let redirecting = peers.redirecting.pid();
    let (got, s) = measured(get_cmd(&url, true), size, redirecting, garage).await;
    assert_whole(&got, size, "(c)");
    assert_eq!(got.redirects, 1, "(c): {got:?}");
    runs.redirected.push(s);
    let url = blob_url(&peers.diskless.url(), &digest);
    let (got, s) = measured(get_cmd(&url, false), size, peers.diskless.pid(), garage).await;
    assert_whole(&got, size, "local = false");
    runs.diskless.push(s);
    runs.others += spent0.others(&Spent::now(&peers.pids()));
}

async fn bench_shared(img: &BuiltImage) {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1) as usize;
    let peers = SharedPeers::start(img).await;
    let load_before = loadavg();
    let mut runs = SharedRuns::default();
    for _ in 0..rounds {
        fresh_round(&peers, img, &mut runs).await;
        kept_round(&peers, img, &mut runs).await;
    }
    let upstream_bytes = peers.front.bytes("GET", &img.layers[0].0);
    println!(
        "\n## A {blob_mib} MiB blob the bucket holds, read through a replica that does not hold it, \
         median of {rounds} (load before: {load_before}, after: {})\n",
        loadavg()
    );
    print_shared(&runs);
    println!(
        "\nUpstream blob bytes during these rounds: {upstream_bytes}; objects the fresh replicas \
         read from the bucket: {}; CPU used by other processes on the machine during \
         the rounds: {:.1} s.",
        runs.from_bucket, runs.others
    );
}

fn print_shared(runs: &SharedRuns) {
    println!(
        "| path | MiB/s | / straight from Garage | berth CPU s per GiB | Garage CPU s per GiB | \
         machine busy (all cores) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let reference = median(runs.presigned.iter().map(|s| s.mibps).collect());
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
    row(
        "(b) presigned URL, straight from Garage (reference)",
        &runs.presigned,
    );
    row(
        "(a) first read through a replica with an empty local tier: bucket → berth → client",
        &runs.fresh,
    );
    row(
        "(a) through a replica with `storage.local = false`: bucket → berth → client, no local copy",
        &runs.diskless,
    );
    row(
        "(c) redirect mode, `curl -L` through berth: 307, then Garage",
        &runs.redirected,
    );
    row(
        "the same replica as (a), read again: its local disk",
        &runs.local,
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
    bench::describe_machine();
    let img = build(dir.path(), blob_mib, 7);
    if all || which.iter().any(|w| w == "herd") {
        bench_herd(&img).await;
    }
    if all || which.iter().any(|w| w == "shared") {
        bench_shared(&img).await;
    }
}
