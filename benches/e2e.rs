//! End-to-end benchmarks against real peers, each reference measured in the same run:
//!
//! - `pull`: warm throughput of a 256 MiB blob through berth vs nginx serving the same
//!   file; a cold pull of a 3-layer ~100 MiB image through berth vs straight from the
//!   registry.
//! - `manifest`: cached manifest requests per second (wrk) by tag and by digest through
//!   berth vs nginx serving the same bytes as a file.
//! - `herd`: N concurrent cold pulls of one 256 MiB blob through berth vs through
//!   distribution's own proxy mode, behind an upstream limited per connection (a CDN):
//!   upstream bytes, wall time until every client has the whole blob, proxy peak RSS.
//!
//! - `ratelimit`: the demo of `scripts/demo-ratelimit.sh`: a burst of pulls straight at a
//!   Docker Hub emulator (the later ones get 429) and the same burst through berth.
//!
//! Run with `scripts/bench.sh` / `scripts/bench-herd.sh` / `scripts/demo-ratelimit.sh`
//! (or `cargo bench --bench e2e -- pull|herd|ratelimit`). Sizes and rates come from the
//! environment (`BENCH_*`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::berth::{Berth, UpstreamSpec};
use support::front::{Faults, Front};
use support::image::{build_image, push, BuiltImage, ImageSpec, Platform, LAYOUT_REF};
use support::registry::{Registry, RegistryOptions};

const MIB: u64 = 1024 * 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Downloads `url` fully, `n` times at once; returns total bytes and wall time.
async fn download(url: &str, n: usize) -> (u64, Duration) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move {
                let mut resp = client.get(&url).send().await.expect("GET");
                assert!(resp.status().is_success(), "{url}: {}", resp.status());
                let mut got = 0u64;
                while let Some(c) = resp.chunk().await.expect("body") {
                    got += c.len() as u64;
                }
                got
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total, started.elapsed())
}

/// Downloads `url` fully with `n` curl processes at once (an external client: an
/// in-process one is slower than the server under test); returns total bytes and wall time.
fn curl_download(url: &str, n: usize) -> (u64, Duration) {
    let started = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "-w", "%{size_download}", url])
                .stdout(Stdio::piped())
                .spawn()
                .expect("run curl")
        })
        .collect();
    let mut total = 0;
    for c in children {
        let out = c.wait_with_output().expect("curl");
        assert!(out.status.success(), "curl {url} failed");
        total += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
    }
    (total, started.elapsed())
}

/// CPU seconds (user + system) a process and its children have used, from
/// `/proc/<pid>/stat` (fields 14-17, in clock ticks).
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The command name may hold spaces: fields are counted after its closing paren.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // After ')': state is index 0, so utime is 11, stime 12 (fields 14 and 15).
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    };
    // nginx serves from worker processes: count every child of `pid` too.
    let mut total = ticks(pid);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(pid) {
                total += ticks(child);
            }
        }
    }
    total as f64 / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(root: &std::path::Path) -> Nginx {
        let bin = support::require_tool("nginx");
        let dir = tempfile::tempdir().unwrap();
        let port = support::free_port();
        let conf = format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
               uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
            d = dir.path().display(),
            root = root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn push_image(
    registry: &Registry,
    dir: &std::path::Path,
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

/// Fetches what `ctr pull` would: the manifest, then config and layers in parallel.
async fn pull_image(base: &str, repo: &str, img: &BuiltImage) -> Duration {
    let started = Instant::now();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let m = client
        .get(format!("{base}/v2/{repo}/manifests/v1"))
        .header("accept", support::image::MANIFEST_MEDIA_TYPE)
        .send()
        .await
        .unwrap();
    assert!(m.status().is_success());
    m.bytes().await.unwrap();
    let mut urls = vec![format!("{base}/v2/{repo}/blobs/{}", img.config_digest)];
    urls.extend(
        img.layers
            .iter()
            .map(|(d, _)| format!("{base}/v2/{repo}/blobs/{d}")),
    );
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|u| tokio::spawn(async move { download(&u, 1).await }))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn bench_pull() {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rounds = env_u64("BENCH_ROUNDS", 5) as usize;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(RegistryOptions::default()).await;
    let big = push_image(&registry, dir.path(), "library/big", &[blob_mib * MIB], 1).await;
    let berth = Berth::start(&[UpstreamSpec::docker_hub(&registry.url())]).await;
    let (digest, size) = big.layers[0].clone();
    let url = format!("{}/v2/library/big/blobs/{digest}", berth.url());
    download(&url, 1).await; // warm it

    // nginx serves the very file berth stored.
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(big.blob_path(&digest), root.path().join("blob")).unwrap();
    let nginx = Nginx::start(root.path());
    let nginx_url = format!("http://127.0.0.1:{}/blob", nginx.port);
    download(&nginx_url, 1).await;

    println!(
        "\n## Warm throughput, {blob_mib} MiB blob ({} B), curl clients, median of {rounds}\n",
        size
    );
    println!("| clients | berth MiB/s | nginx MiB/s | berth / nginx | berth CPU s/GiB | nginx CPU s/GiB | CPU berth / nginx |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let berth_pid = berth.pid().expect("berth pid");
    let nginx_pid = nginx.child.id();
    for clients in [1usize, 4] {
        let (mut b, mut n, mut bc, mut nc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let cpu = cpu_seconds(berth_pid);
            let (bytes, d) = curl_download(&url, clients);
            bc.push((cpu_seconds(berth_pid) - cpu) / (bytes as f64 / (1024.0 * MIB as f64)));
            b.push(mibps(bytes, d));
            let cpu = cpu_seconds(nginx_pid);
            let (bytes, d) = curl_download(&nginx_url, clients);
            nc.push((cpu_seconds(nginx_pid) - cpu) / (bytes as f64 / (1024.0 * MIB as f64)));
            n.push(mibps(bytes, d));
        }
        let (b, n, bc, nc) = (median(b), median(n), median(bc), median(nc));
        println!(
            "| {clients} | {b:.0} | {n:.0} | {:.2} | {bc:.2} | {nc:.2} | {:.1} |",
            b / n,
            bc / nc.max(0.01)
        );
    }
    drop(berth);

    // Cold pull: a fresh berth each round, against the same upstream as the direct pull:
    // once unlimited (loopback: berth's own cost shows), once at a CDN-like rate per
    // connection (what a cluster sees).
    let layers = [50 * MIB, 30 * MIB, 20 * MIB];
    let img = push_image(&registry, dir.path(), "library/app", &layers, 2).await;
    let cdn_rate = env_u64("BENCH_CDN_RATE_MIB", 100);
    println!("\n## Cold pull, 3 layers (50 + 30 + 20 MiB), median of {rounds}\n");
    println!("| upstream | direct s | through berth (cold) s | berth / direct |");
    println!("|---|---:|---:|---:|");
    for rate in [None, Some(cdn_rate)] {
        let front = Front::start(&registry.url()).await;
        front.set_faults(Faults {
            throttle: rate.map(|r| r * MIB),
            ..Faults::default()
        });
        let mut direct = Vec::new();
        let mut via = Vec::new();
        for _ in 0..rounds {
            direct.push(
                pull_image(&front.url(), "library/app", &img)
                    .await
                    .as_secs_f64(),
            );
            let berth = Berth::start(&[UpstreamSpec::docker_hub(&front.url())]).await;
            via.push(
                pull_image(&berth.url(), "library/app", &img)
                    .await
                    .as_secs_f64(),
            );
        }
        let (d, v) = (median(direct), median(via));
        let label = rate.map_or("loopback, unlimited".to_owned(), |r| {
            format!("{r} MiB/s per connection")
        });
        println!("| {label} | {d:.3} | {v:.3} | {:.2} |", v / d);
    }
}

/// Requests per second `wrk` (1 thread, 32 connections) gets from `url` in `secs`.
fn wrk_rate(url: &str, accept: &str, secs: u64) -> f64 {
    let out = Command::new(support::require_tool("wrk"))
        .args(["-t1", "-c32", &format!("-d{secs}s"), "-H"])
        .arg(format!("Accept: {accept}"))
        .arg(url)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Non-2xx"),
        "wrk got errors from {url}:\n{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"))
}

async fn bench_manifest() {
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let secs = env_u64("BENCH_SECS", 5);
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(RegistryOptions::default()).await;
    let img = push_image(&registry, dir.path(), "library/small", &[4096], 3).await;
    let berth = Berth::start(&[UpstreamSpec::docker_hub(&registry.url())]).await;
    let accept = support::image::MANIFEST_MEDIA_TYPE;
    let by_tag = format!("{}/v2/library/small/manifests/v1", berth.url());
    let by_digest = format!(
        "{}/v2/library/small/manifests/{}",
        berth.url(),
        img.manifest_digest
    );
    let warm = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-H"])
        .arg(format!("Accept: {accept}"))
        .arg(&by_tag)
        .status()
        .expect("curl");
    assert!(warm.success());
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("manifest"), &img.manifest).unwrap();
    let nginx = Nginx::start(root.path());
    let nginx_url = format!("http://127.0.0.1:{}/manifest", nginx.port);
    let berth_pid = berth.pid().expect("berth pid");
    let (mut t, mut d, mut n, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let before = cpu_seconds(berth_pid);
        let rate = wrk_rate(&by_tag, accept, secs);
        cpu.push((cpu_seconds(berth_pid) - before) / (rate * secs as f64) * 1e6);
        t.push(rate);
        d.push(wrk_rate(&by_digest, accept, secs));
        n.push(wrk_rate(&nginx_url, accept, secs));
    }
    let (t, d, n, cpu) = (median(t), median(d), median(n), median(cpu));
    println!(
        "\n## Cached manifest ({} B), wrk -t1 -c32 -d{secs}s, median of {rounds}\n",
        img.manifest.len()
    );
    println!("| berth by tag req/s | berth by digest req/s | nginx (file) req/s | tag / nginx | digest / nginx | berth CPU µs per request |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {t:.0} | {d:.0} | {n:.0} | {:.2} | {:.2} | {cpu:.0} |",
        t / n,
        d / n
    );
}

async fn bench_herd() {
    let blob_mib = env_u64("BENCH_BLOB_MIB", 256);
    let rate_mib = env_u64("BENCH_RATE_MIB", 10);
    let ns: Vec<usize> = std::env::var("BENCH_N")
        .unwrap_or_else(|_| "1,10,50,200".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(RegistryOptions::default()).await;
    let img = push_image(&registry, dir.path(), "library/big", &[blob_mib * MIB], 3).await;
    let (digest, size) = img.layers[0].clone();
    println!(
        "\n## Herd: N concurrent cold pulls of one {blob_mib} MiB blob, upstream {rate_mib} MiB/s per connection\n"
    );
    println!("| proxy | N | upstream bytes (x blob) | wall s | wall / wall(N=1) | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    for proxy in ["berth", "distribution"] {
        let mut base_wall = None;
        for &n in &ns {
            let front = Front::start(&registry.url()).await;
            front.set_faults(Faults {
                throttle: Some(rate_mib * MIB),
                ..Faults::default()
            });
            let (wall, got, rss) = if proxy == "berth" {
                let berth = Berth::start(&[UpstreamSpec::docker_hub(&front.url())]).await;
                let url = format!("{}/v2/library/big/blobs/{digest}", berth.url());
                let (got, wall) = download(&url, n).await;
                (wall, got, peak_rss_mib(berth.pid().unwrap()))
            } else {
                let reg =
                    Registry::start(RegistryOptions::default().with_proxy(&front.url(), None))
                        .await;
                let url = format!("{}/v2/library/big/blobs/{digest}", reg.url());
                let (got, wall) = download(&url, n).await;
                (wall, got, peak_rss_mib(reg.pid().unwrap()))
            };
            assert_eq!(got, size * n as u64, "{proxy} N={n}: short bodies");
            let up = front.bytes("GET", &digest) as f64 / size as f64;
            let w = wall.as_secs_f64();
            let base = *base_wall.get_or_insert(w);
            println!(
                "| {proxy} | {n} | {up:.2} | {w:.1} | {:.2} | {rss:.0} |",
                w / base
            );
        }
    }
}

/// One kubelet-style pull straight at Docker Hub: token, HEAD the tag (free), GET the
/// manifest by digest (counted). Returns the GET's status.
async fn pull_direct(hub_url: &str, repo: &str) -> u16 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token: serde_json::Value = client
        .get(format!(
            "{hub_url}/token?service=registry.docker.io&scope=repository:{repo}:pull"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap_or_default().to_owned();
    let accept = support::image::MANIFEST_MEDIA_TYPE;
    let head = client
        .head(format!("{hub_url}/v2/{repo}/manifests/v1"))
        .bearer_auth(&token)
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let digest = head
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    client
        .get(format!("{hub_url}/v2/{repo}/manifests/{digest}"))
        .bearer_auth(&token)
        .header("accept", accept)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The same pull through berth (containerd's `?ns=docker.io` included).
async fn pull_via_berth(berth: &str, repo: &str) -> u16 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let accept = support::image::MANIFEST_MEDIA_TYPE;
    let head = client
        .head(format!("{berth}/v2/{repo}/manifests/v1?ns=docker.io"))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    if !head.status().is_success() {
        return head.status().as_u16();
    }
    let digest = head.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    client
        .get(format!("{berth}/v2/{repo}/manifests/{digest}?ns=docker.io"))
        .header("accept", accept)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
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
                tasks.push(tokio::spawn(async move {
                    if via_berth {
                        pull_via_berth(&target, repo).await
                    } else {
                        pull_direct(&target, repo).await
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
    if all || which.iter().any(|w| w == "pull") {
        bench_pull().await;
    }
    if all || which.iter().any(|w| w == "manifest") {
        bench_manifest().await;
    }
    if all || which.iter().any(|w| w == "herd") {
        bench_herd().await;
    }
    if all || which.iter().any(|w| w == "ratelimit") {
        demo_ratelimit().await;
    }
}
