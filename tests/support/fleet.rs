//! A fleet of berth replicas on loopback: each knows the others' addresses (chosen before
//! any starts), they share one fleet secret and, usually, one Garage bucket.

use std::net::SocketAddr;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

use super::berth::{Berth, Extra, UpstreamSpec};

pub struct Fleet {
    pub replicas: Vec<Berth>,
    pub secret: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free address for a replica that must be named before it starts. Taken below the
/// kernel's ephemeral range (where `free_port()` and every outgoing connection get theirs),
/// so that nothing else in a parallel test run can take it in the meantime.
fn fleet_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread runs apart by PID; step through 20000..32000.
    let base = 20_000 + (std::process::id() % 6_000) as u16 * 2;
    for _ in 0..12_000 {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in 20000..32000");
}

impl Fleet {
    /// Starts `n` replicas of one upstream, each with `shared` (a `[storage.shared]`
    /// block, or empty) and `top` (extra top-level TOML).
    pub async fn start(n: usize, upstream: &UpstreamSpec, shared: &str, top: &str) -> Fleet {
        let dir = tempfile::tempdir().expect("fleet tempdir");
        let secret = dir.path().join("fleet-secret");
        std::fs::write(&secret, "a-fleet-secret-for-tests-0123456789\n").expect("secret");
        let addrs: Vec<SocketAddr> = (0..n).map(|_| fleet_addr()).collect();
        let peers = addrs
            .iter()
            .map(|a| format!("\"http://{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut replicas = Vec::new();
        for addr in &addrs {
            let extra = Extra {
                top: format!(
                    "{shared}\n[fleet]\nadvertise = \"http://{addr}\"\npeers = [{peers}]\n\
                     secret_file = \"{}\"\npeer_timeout = \"1s\"\n{top}\n",
                    secret.display()
                ),
                listen: Some(*addr),
                ..Extra::default()
            };
            replicas.push(Berth::start_opts(std::slice::from_ref(upstream), &extra).await);
        }
        Fleet {
            replicas,
            secret,
            _dir: dir,
        }
    }

    /// The index of the replica that owns `key` (a digest, or a tag key), computed as
    /// berth does: the highest first-8-bytes of SHA-256(`http://addr` NUL key). Pinned
    /// here on purpose: replicas of different builds must agree on it.
    pub fn owner_of(&self, key: &str) -> usize {
        let score = |b: &Berth| {
            let mut h = Sha256::new();
            h.update(format!("http://{}", b.addr).as_bytes());
            h.update([0]);
            h.update(key.as_bytes());
            let out = h.finalize();
            u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
        };
        (0..self.replicas.len())
            .max_by_key(|i| score(&self.replicas[*i]))
            .expect("a replica")
    }

    /// Sum of one metric sample over every running replica.
    pub async fn metric_sum(&self, sample: &str) -> f64 {
        let mut total = 0.0;
        for r in &self.replicas {
            if r.pid().is_some() {
                total += r.metric(sample).await;
            }
        }
        total
    }
}
