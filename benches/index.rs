//! The store's index and start-up, measured in-process (no peers):
//!
//! - `index`: lookup (`has_blob` of a random stored key), insert (`insert_blob` of a new
//!   blob, one durable redb transaction) and touch (`touch_many` of 100 random stored
//!   keys, one transaction) on an index holding `BENCH_INDEX_N` blobs (1,000,000, filled
//!   through `insert_blob`: about 2.5 min here; `BENCH_INDEX_FILL=bulk` fills it in
//!   seconds), with criterion; then one-shot timings of the whole-table reads
//!   (`blob_keys`, which start-up reconciliation walks, and `eviction_candidates`).
//! - `startup`: `Store::open` on a store of `BENCH_STARTUP_BLOBS` files (100,000) with
//!   its index (what every restart costs), and with `index.redb` deleted (the rebuild).
//!
//! Run with `cargo bench --bench index` (`-- index` or `-- startup` for one part). Figures
//! and how to read them: docs/benchmarks.md, "Store index and start-up".

use std::path::Path;
use std::time::{Duration, Instant};

use berth::oci::Digest;
use berth::store::{Index, Store};
use criterion::{BatchSize, Criterion};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The digest of blob number `i`: distinct, and spread over the key space as real
/// digests are.
fn digest(i: u64) -> Digest {
    Digest::sha256_of(&i.to_le_bytes())
}

/// A small deterministic PRNG (xorshift64*): the same random keys in every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it and must not spend minutes filling a million-entry index.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("index benchmarks run under `cargo bench --bench index`");
        return;
    }
    let filter: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
    let wants = |part: &str| filter.is_empty() || filter.iter().any(|f| part.contains(f.as_str()));
    println!(
        "machine: {} ({} CPUs)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wants("index") {
        bench_index();
    }
    if wants("startup") {
        bench_startup();
    }
}

/// What one `insert_blob` costs when that is the only way in: one durable transaction
/// per blob. Returns the mean.
fn insert_rate(dir: &Path, n: u64) -> Duration {
    let index = Index::open(&dir.join("probe.redb")).expect("open probe index");
    let started = Instant::now();
    for i in 0..n {
        index.insert_blob(&digest(i), 1, None).expect("insert_blob");
    }
    started.elapsed() / n as u32
}

/// An index holding blobs `0..n`, quickly (`BENCH_INDEX_FILL=bulk`, for iterating on the
/// bench): `insert_blob` commits and fsyncs once per call and the index has no bulk
/// insert, so the entries go in through redb directly, in the index's own schema, 100,000
/// per transaction. The index then opens them (its tables are typed: a schema that
/// drifted fails loudly), and a sample is looked up through its API to prove it sees them.
fn build_index(path: &Path, n: u64) -> Index {
    const BLOBS: redb::TableDefinition<&str, (u64, u64)> = redb::TableDefinition::new("blobs");
    let db = redb::Database::create(path).expect("create index");
    let now = berth::clock::now_secs();
    let batch = 100_000;
    for start in (0..n).step_by(batch) {
        let txn = db.begin_write().expect("begin");
        {
            let mut blobs = txn.open_table(BLOBS).expect("blobs table");
            for i in start..(start + batch as u64).min(n) {
                // Access times spread over a month, as a long-running cache has them.
                let at = now - (i * 2_654_435_761) % (30 * 86_400);
                blobs
                    .insert(digest(i).to_string().as_str(), (4096 + i % 1_000_000, at))
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    drop(db);
    let index = Index::open(path).unwrap_or_else(|e| panic!("open the built index: {e}"));
    let mut rng = Rng(7);
    for _ in 0..1000 {
        let i = rng.below(n as usize) as u64;
        assert!(
            index.has_blob(&digest(i).to_string()).expect("has_blob"),
            "blob {i} missing: the bench's schema no longer matches the index's"
        );
    }
    index
}

/// An index holding blobs `0..n`, filled the only way berth's API allows (the default):
/// one `insert_blob`, one durable transaction, per blob. Prints the rate as it goes.
fn fill_through_api(path: &Path, n: u64) -> Index {
    let index = Index::open(path).expect("open index");
    let started = Instant::now();
    let mut last = Instant::now();
    for i in 0..n {
        index
            .insert_blob(&digest(i), 4096 + i % 1_000_000, None)
            .expect("insert_blob");
        if (i + 1) % 100_000 == 0 {
            println!(
                "  {} blobs after {:.0} s ({:?} per insert over the last 100,000)",
                i + 1,
                started.elapsed().as_secs_f64(),
                last.elapsed() / 100_000
            );
            last = Instant::now();
        }
    }
    index
}

fn bench_index() {
    let n = env_usize("BENCH_INDEX_N", 1_000_000) as u64;
    let dir = tempfile::tempdir_in(env_dir()).expect("tempdir");

    let probe_n = env_usize("BENCH_INDEX_PROBE", 2_000) as u64;
    let per_insert = insert_rate(dir.path(), probe_n);
    println!(
        "insert_blob one by one (one durable transaction each), {probe_n} into an empty index: \
         {per_insert:?} each, so {n} would take {:.0} s",
        per_insert.as_secs_f64() * n as f64
    );

    let path = dir.path().join("index.redb");
    let through_api = std::env::var("BENCH_INDEX_FILL").map_or(true, |v| v != "bulk");
    let started = Instant::now();
    let index = if through_api {
        fill_through_api(&path, n)
    } else {
        build_index(&path, n)
    };
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    println!(
        "filled an index with {n} blobs ({}) in {:.1} s; index.redb is {:.0} MiB",
        if through_api {
            "insert_blob, one transaction each"
        } else {
            "redb directly, 100,000 per transaction"
        },
        started.elapsed().as_secs_f64(),
        size as f64 / (1 << 20) as f64
    );

    let keys: Vec<Digest> = (0..n).map(digest).collect();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = c.benchmark_group(format!("index_{n}"));
    let mut rng = Rng(42);
    group.bench_function("lookup", |b| {
        b.iter_batched(
            || keys[rng.below(keys.len())].to_string(),
            |key| assert!(index.has_blob(&key).unwrap()),
            BatchSize::SmallInput,
        )
    });
    let mut next = n;
    group.bench_function("insert", |b| {
        b.iter_batched(
            || {
                next += 1;
                digest(next)
            },
            |d| index.insert_blob(&d, 4096, None).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let now = berth::clock::now_secs();
    group.bench_function("touch_100", |b| {
        b.iter_batched(
            || {
                (0..100)
                    .map(|_| (keys[rng.below(keys.len())].clone(), now))
                    .collect::<Vec<_>>()
            },
            |touches| index.touch_many(&touches).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    let started = Instant::now();
    let all = index.blob_keys().expect("blob_keys");
    println!(
        "blob_keys() of {} blobs: {:.2} s",
        all.len(),
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let candidates = index.eviction_candidates().expect("eviction_candidates");
    println!(
        "eviction_candidates() of {} blobs: {:.2} s",
        candidates.len(),
        started.elapsed().as_secs_f64()
    );
}

fn bench_startup() {
    let n = env_usize("BENCH_STARTUP_BLOBS", 100_000) as u64;
    let dir = tempfile::tempdir_in(env_dir()).expect("tempdir");
    let root = dir.path().join("store");
    let sha256 = root.join("blobs/sha256");
    for prefix in 0..=255u8 {
        std::fs::create_dir_all(sha256.join(format!("{prefix:02x}"))).expect("mkdir");
    }
    let started = Instant::now();
    for i in 0..n {
        let content = i.to_le_bytes();
        let d = Digest::sha256_of(&content);
        let hex = d.hex();
        std::fs::write(sha256.join(&hex[..2]).join(hex), content).expect("write blob");
    }
    println!(
        "wrote {n} blob files in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // First open: no index at all, every file adopted.
    let first = time_open(&root, n);
    println!(
        "Store::open, no index (first open): {:.2} s",
        first.as_secs_f64()
    );

    let runs = env_usize("BENCH_STARTUP_RUNS", 5);
    let mut warm: Vec<Duration> = (0..runs).map(|_| time_open(&root, n)).collect();
    warm.sort();
    println!(
        "Store::open with its index, warm page cache, {runs} runs: median {:.3} s (min {:.3}, max {:.3})",
        warm[runs / 2].as_secs_f64(),
        warm[0].as_secs_f64(),
        warm[runs - 1].as_secs_f64()
    );

    let rebuild_runs = env_usize("BENCH_REBUILD_RUNS", 1);
    let mut rebuild: Vec<Duration> = (0..rebuild_runs)
        .map(|_| {
            std::fs::remove_file(root.join("index.redb")).expect("remove index.redb");
            time_open(&root, n)
        })
        .collect();
    rebuild.sort();
    println!(
        "Store::open with index.redb deleted (rebuild), {rebuild_runs} runs: median {:.2} s",
        rebuild[rebuild_runs / 2].as_secs_f64()
    );
}

/// Times one `Store::open` (temp clean-up, index open, reconciliation) and checks that
/// it found every blob.
fn time_open(root: &Path, n: u64) -> Duration {
    let started = Instant::now();
    let store = Store::open(root).expect("Store::open");
    let took = started.elapsed();
    assert_eq!(store.totals().expect("totals").0, n, "blobs after open");
    drop(store);
    took
}

/// Where the benchmark's stores go: `BENCH_DIR`, else the system temp dir. (On a tmpfs
/// fsync is free and the insert figures mean nothing: use a real disk.)
fn env_dir() -> std::path::PathBuf {
    std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, Into::into)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
