//! A world for pull tests: the real registry with images pushed to it, the counting front
//! before it, and berth pointed at the front as docker.io.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Front;
use crate::support::image::{
    build_image, build_index, push, BuiltImage, BuiltIndex, ImageSpec, Platform, LAYOUT_REF,
};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::{http, wait_until};

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * KIB;

pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

pub struct World {
    pub registry: Registry,
    pub front: Front,
    pub berth: Berth,
    pub dir: tempfile::TempDir,
}

impl World {
    /// Registry + front + berth (docker.io → front) with the given tag TTL.
    pub async fn start(ttl: &str) -> World {
        Self::start_with(ttl, "", "").await
    }

    /// Like `start`, with extra TOML for docker.io's block and for the top level.
    pub async fn start_with(ttl: &str, upstream_extra: &str, top_extra: &str) -> World {
        let registry = Registry::start(RegistryOptions::default()).await;
        let front = Front::start(&registry.url()).await;
        let berth = Berth::start_with(
            &[UpstreamSpec::docker_hub(&front.url())
                .ttl(ttl)
                .extra(upstream_extra)],
            top_extra,
        )
        .await;
        World {
            registry,
            front,
            berth,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Builds a single-platform image and pushes it to the registry as `repo:tag`.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[usize],
        seed: u64,
    ) -> BuiltImage {
        push_single(&self.registry, self.dir.path(), repo, tag, layers, seed).await
    }

    /// Builds a linux/amd64 + linux/arm64 index and pushes it as `repo:tag`.
    pub async fn push_index(&self, repo: &str, tag: &str, seed: u64) -> BuiltIndex {
        let dir = self.dir.path().join(format!("idx-{seed}"));
        let built = build_index(
            &dir,
            &[
                (
                    Platform::LINUX_AMD64,
                    ImageSpec {
                        layer_sizes: vec![300 * KIB, 200 * KIB],
                        seed,
                    },
                ),
                (
                    Platform::LINUX_ARM64,
                    ImageSpec {
                        layer_sizes: vec![250 * KIB, 150 * KIB],
                        seed: seed + 1000,
                    },
                ),
            ],
        );
        push(
            &built.layout,
            LAYOUT_REF,
            &format!("{}/{repo}:{tag}", self.registry.host()),
            None,
        )
        .await;
        built
    }
}

/// Builds a single-platform image under `dir` and pushes it to `registry` as `repo:tag`.
pub async fn push_single(
    registry: &Registry,
    dir: &std::path::Path,
    repo: &str,
    tag: &str,
    layers: &[usize],
    seed: u64,
) -> BuiltImage {
    let dir = dir.join(format!("img-{seed}"));
    let spec = ImageSpec {
        layer_sizes: layers.to_vec(),
        seed,
    };
    let built = build_image(&dir, &spec, Platform::LINUX_AMD64);
    push(
        &built.layout,
        LAYOUT_REF,
        &format!("{}/{repo}:{tag}", registry.host()),
        None,
    )
    .await;
    built
}

/// The digest of a response's body as it streams, or why it was aborted.
pub async fn hash_body(mut resp: reqwest::Response) -> Result<String, String> {
    let mut hasher = crate::support::image::Sha256Stream::default();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => hasher.update(&c),
            Ok(None) => return Ok(hasher.digest()),
            Err(e) => return Err(format!("aborted: {e}")),
        }
    }
}

/// A GET/HEAD against berth's pull API with containerd's Accept header.
pub async fn get(url: &str, head: bool) -> reqwest::Response {
    let client = http();
    let req = if head {
        client.head(url)
    } else {
        client.get(url)
    };
    req.header("accept", ACCEPT_ALL)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

/// The OCI error code of a JSON error body.
pub async fn error_code(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("status {status}: body is not OCI JSON ({e}): {body}"));
    let code = v["errors"][0]["code"].as_str().unwrap_or("").to_owned();
    let message = v["errors"][0]["message"].as_str().unwrap_or("").to_owned();
    (status, code, message)
}

/// Repeats `attempt` until the front has seen one more `method` request whose path
/// contains `part` than before the first attempt: the observable moment a TTL ran out and
/// berth asked the upstream. Use it instead of sleeping past a tag TTL: the wait ends when
/// the TTL has run out (tag records are stamped in milliseconds), however loaded the
/// machine, and no sooner than the TTL after the fill. Every attempt but the last
/// was answered without asking the upstream (within the TTL: counts asserted before the
/// wait still hold). Returns each attempt's result, the one that asked last. Panics after
/// 20 s.
pub async fn until_upstream_asked<T, F, Fut>(
    front: &Front,
    method: &str,
    part: &str,
    mut attempt: F,
) -> Vec<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let before = front.count(method, part);
    let results = RefCell::new(Vec::new());
    let asked = wait_until(Duration::from_secs(20), || {
        let next = attempt();
        let results = &results;
        async move {
            let result = next.await;
            results.borrow_mut().push(result);
            front.count(method, part) > before
        }
    })
    .await;
    assert!(
        asked,
        "no {method} of {part} reached the upstream within 20 s: {:?}",
        front.content_requests()
    );
    results.into_inner()
}

/// Whether the store holds `digest` (`sha256:...`).
pub fn is_stored(data: &std::path::Path, digest: &str) -> bool {
    data.join(format!("blobs/sha256/{}/{}", &digest[7..9], &digest[7..]))
        .exists()
}

/// Waits (up to 10 s) for a blob to land: clients get their last byte once it is
/// verified, a moment before it is fsynced and renamed into the store.
pub async fn wait_stored(data: &std::path::Path, digest: &str) -> bool {
    wait_until(Duration::from_secs(10), || async {
        is_stored(data, digest)
    })
    .await
}

/// Files in the store's temp directory: fills (or uploads) still in progress.
pub fn temp_count(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("tmp")).map_or(0, |d| d.count())
}

/// Waits (up to 10 s) for fills in progress to end, then checks that every file under
/// the store's blob tree hashes to its name and no temp file is left.
pub async fn assert_store_consistent(data: &std::path::Path) {
    // No early return needed: the temp-file check below reports what is left.
    wait_until(Duration::from_secs(10), || async { temp_count(data) == 0 }).await;
    assert_blobs_hash_to_names(data, "store");
    let tmp = data.join("tmp");
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        let left: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "temp files left behind: {left:?}");
    }
}

/// Every file under the blob tree hashes to its name (`when` names the moment, for the
/// message); returns how many files were checked.
pub fn assert_blobs_hash_to_names(data: &std::path::Path, when: &str) -> usize {
    let mut checked = 0;
    let Ok(prefixes) = std::fs::read_dir(data.join("blobs/sha256")) else {
        return 0;
    };
    for prefix in prefixes {
        for file in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let file = file.unwrap();
            let bytes = std::fs::read(file.path()).unwrap();
            assert_eq!(
                crate::support::image::sha256_hex(&bytes),
                file.file_name().to_string_lossy(),
                "{when}: stored file {} does not hash to its name",
                file.path().display()
            );
            checked += 1;
        }
    }
    checked
}
