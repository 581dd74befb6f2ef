//! OCI images built offline, and pushed to a registry with skopeo.
//!
//! This module owns the bytes of test images: uncompressed tar layers (ustar headers
//! written here, one directory and one regular file of seeded pseudo-random bytes per
//! layer, so layers differ, do not compress, and containerd can unpack them), the image
//! config, the manifest, an optional two-platform index, all written as an OCI image
//! layout directory. The same `(seed, layer index, size)` always gives the same layer,
//! so two specs sharing a seed share layers. Pushing goes through `skopeo copy
//! --preserve-digests`, which copies these blobs verbatim: the digests a test computed
//! here are the digests the registry serves.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The name (`org.opencontainers.image.ref.name`) each built layout gives its image.
pub const LAYOUT_REF: &str = "latest";

/// A fixed timestamp, so the same spec always builds the same bytes.
const MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2023-11-14T22:13:20Z";
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// An OS and CPU pair, as in an index's `platform`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: &'static str,
    pub architecture: &'static str,
}

impl Platform {
    pub const LINUX_AMD64: Platform = Platform {
        os: "linux",
        architecture: "amd64",
    };
    pub const LINUX_ARM64: Platform = Platform {
        os: "linux",
        architecture: "arm64",
    };
}

/// What to build: one layer per size (bytes of file content), contents drawn from `seed`.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub layer_sizes: Vec<usize>,
    pub seed: u64,
}

/// A built single-platform image and the digests a registry must serve for it.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The OCI layout directory holding every blob.
    pub layout: PathBuf,
    pub platform: Platform,
    /// The manifest's exact bytes, `sha256:<hex>` digest and size.
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub config_digest: String,
    pub config_size: u64,
    /// `(sha256:<hex> digest, size in bytes)` of each layer blob, bottom first.
    pub layers: Vec<(String, u64)>,
}

impl BuiltImage {
    /// Where a blob of this layout lives on disk.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.layout, digest)
    }

    /// A blob's bytes, e.g. to compare with what a registry or berth served.
    pub fn read_blob(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.blob_path(digest)).expect("read blob")
    }
}

/// A built multi-platform image: an OCI index over one manifest per platform.
#[derive(Clone, Debug)]
pub struct BuiltIndex {
    pub layout: PathBuf,
    pub index: Vec<u8>,
    pub index_digest: String,
    pub index_size: u64,
    /// In the order the platforms were given.
    pub manifests: Vec<BuiltImage>,
}

/// `sha256` of `bytes` as lowercase hex, without the `sha256:` prefix.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// `sha256:<hex>` of `bytes`: an OCI digest.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// A streaming sha256 for bodies too large to hold.
#[derive(Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn update(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }

    pub fn digest(self) -> String {
        format!("sha256:{}", hex(&self.0.finalize()))
    }
}

/// Builds one image into the OCI layout `dir` (created if missing), tagged [`LAYOUT_REF`].
pub fn build_image(dir: &Path, spec: &ImageSpec, platform: Platform) -> BuiltImage {
    init_layout(dir);
    let image = write_image(dir, spec, platform);
    write_layout_index(
        dir,
        MANIFEST_MEDIA_TYPE,
        &image.manifest_digest,
        image.manifest_size,
    );
    image
}

/// Builds one image per `(platform, spec)` and an OCI index over them into the layout
/// `dir`, tagged [`LAYOUT_REF`]. Give each platform its own seed for distinct layers.
pub fn build_index(dir: &Path, images: &[(Platform, ImageSpec)]) -> BuiltIndex {
    init_layout(dir);
    let manifests: Vec<BuiltImage> = images
        .iter()
        .map(|(platform, spec)| write_image(dir, spec, *platform))
        .collect();
    let entries: Vec<Value> = manifests
        .iter()
        .map(|image| {
            json!({
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": {
                    "architecture": image.platform.architecture,
                    "os": image.platform.os,
                },
            })
        })
        .collect();
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": entries,
    }));
    let index_digest = write_blob(dir, &index);
    let index_size = index.len() as u64;
    write_layout_index(dir, INDEX_MEDIA_TYPE, &index_digest, index_size);
    BuiltIndex {
        layout: dir.to_owned(),
        index,
        index_digest,
        index_size,
        manifests,
    }
}

/// Copies the image (or index, with every platform) named `reference` in `layout` to
/// `dest` (`127.0.0.1:PORT/repo:tag`) with skopeo, blobs and manifests byte for byte.
///
/// Anonymous unless `credentials` are given; panics if skopeo fails or runs too long.
pub async fn push(layout: &Path, reference: &str, dest: &str, credentials: Option<(&str, &str)>) {
    let mut skopeo = Command::new(super::require_tool("skopeo"));
    // --insecure-policy: not depend on the machine's /etc/containers/policy.json.
    // --preserve-digests: fail rather than let skopeo compress or rewrite anything.
    skopeo
        .args(["--insecure-policy", "copy", "--all", "--preserve-digests"])
        .args(["--dest-tls-verify=false", "--retry-times=0"]);
    match credentials {
        Some((user, password)) => skopeo.arg(format!("--dest-creds={user}:{password}")),
        // Never pick up whatever auth.json the machine has lying around.
        None => skopeo.arg("--dest-no-creds"),
    };
    skopeo
        .arg(format!("oci:{}:{reference}", layout.display()))
        .arg(format!("docker://{dest}"));
    super::run_with_timeout_async(skopeo, PUSH_TIMEOUT)
        .await
        .expect_success("skopeo copy");
}

fn init_layout(dir: &Path) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
}

fn write_layout_index(dir: &Path, media_type: &str, digest: &str, size: u64) {
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": LAYOUT_REF},
        }],
    }));
    std::fs::write(dir.join("index.json"), index).expect("write index.json");
}

fn write_image(dir: &Path, spec: &ImageSpec, platform: Platform) -> BuiltImage {
    let layers: Vec<(String, u64)> = spec
        .layer_sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| write_layer(dir, spec.seed, index, size))
        .collect();
    let diff_ids: Vec<&str> = layers.iter().map(|(digest, _)| digest.as_str()).collect();
    let history: Vec<Value> = (0..layers.len())
        .map(|n| json!({"created": CREATED, "created_by": format!("berth test layer {n}")}))
        .collect();
    let config = to_json(&json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "created": CREATED,
        "config": {
            "Cmd": ["/bin/sh"],
            "Labels": {"berth.test.seed": spec.seed.to_string()},
        },
        // The layers are uncompressed, so each diff_id is the layer's own digest.
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }));
    let config_digest = write_blob(dir, &config);
    let layer_descriptors: Vec<Value> = layers
        .iter()
        .map(
            |(digest, size)| json!({"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": size}),
        )
        .collect();
    let manifest = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descriptors,
    }));
    let manifest_digest = write_blob(dir, &manifest);
    BuiltImage {
        layout: dir.to_owned(),
        platform,
        manifest_size: manifest.len() as u64,
        manifest,
        manifest_digest,
        config_digest,
        config_size: config.len() as u64,
        layers,
    }
}

fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("serialize JSON")
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

/// Stores `bytes` as a blob and returns its digest.
fn write_blob(dir: &Path, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    std::fs::write(blob_path(dir, &digest), bytes).expect("write blob");
    digest
}

/// Streams layer `index` of `seed` to disk as a tar and returns its digest and size.
///
/// Streaming (not building in memory) keeps benchmark-sized layers cheap.
fn write_layer(dir: &Path, seed: u64, index: usize, size: usize) -> (String, u64) {
    let tmp = dir.join(format!("blobs/sha256/.tmp-layer-{seed}-{index}"));
    let mut out = HashingWriter::new(File::create(&tmp).expect("create layer"));
    let dir_name = format!("layer{index}/");
    out.write_all(&tar_header(&dir_name, b'5', 0o755, 0));
    out.write_all(&tar_header(
        &format!("layer{index}/data.bin"),
        b'0',
        0o644,
        size as u64,
    ));
    let mut rng = SplitMix64(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut chunk = vec![0u8; 64 * 1024];
    let mut remaining = size;
    while remaining > 0 {
        let n = remaining.min(chunk.len());
        rng.fill(&mut chunk[..n]);
        out.write_all(&chunk[..n]);
        remaining -= n;
    }
    out.write_all(&vec![0u8; padding(size as u64)]);
    // End of archive: two zero blocks.
    out.write_all(&[0u8; 1024]);
    let (digest, len) = out.finish();
    std::fs::rename(&tmp, blob_path(dir, &digest)).expect("rename layer");
    (digest, len)
}

/// Zero bytes that round `size` up to a whole 512-byte block.
fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

/// A 512-byte ustar header for a regular file (`b'0'`) or directory (`b'5'`) owned by root.
fn tar_header(name: &str, typeflag: u8, mode: u32, size: u64) -> [u8; 512] {
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut header[100..108], u64::from(mode));
    octal(&mut header[108..116], 0); // uid
    octal(&mut header[116..124], 0); // gid
    octal(&mut header[124..136], size);
    octal(&mut header[136..148], MTIME);
    header[156] = typeflag;
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[265..269].copy_from_slice(b"root");
    header[297..301].copy_from_slice(b"root");
    // The checksum is taken with its own field read as spaces, then written as six octal
    // digits, a NUL and a space.
    header[148..156].fill(b' ');
    let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
    header[148..154].copy_from_slice(format!("{sum:06o}").as_bytes());
    header[154] = 0;
    header
}

/// Writes `value` as zero-padded octal filling `field` but its last byte, a NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}", width = field.len() - 1);
    assert_eq!(
        digits.len(),
        field.len() - 1,
        "{value} overflows a tar field"
    );
    field[..digits.len()].copy_from_slice(digits.as_bytes());
    field[digits.len()] = 0;
}

/// A file writer that hashes and counts what passes through it.
struct HashingWriter {
    out: BufWriter<File>,
    hasher: Sha256,
    len: u64,
}

impl HashingWriter {
    fn new(file: File) -> Self {
        HashingWriter {
            out: BufWriter::with_capacity(256 * 1024, file),
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn write_all(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.out.write_all(bytes).expect("write layer");
    }

    fn finish(mut self) -> (String, u64) {
        self.out.flush().expect("flush layer");
        (format!("sha256:{}", hex(&self.hasher.finalize())), self.len)
    }
}

/// The splitmix64 generator: fast, seedable, and its output does not compress.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
