//! The few fields of a manifest or index that berth reads. Everything else is kept
//! verbatim: berth stores and serves the upstream's exact bytes.
//!
//! Two readers, on purpose:
//! - [`Manifest::parse`] is lenient: whatever an upstream serves (OCI, Docker schema 2
//!   and its lists, descriptors without a `mediaType` or `size`) berth must store, link
//!   and serve, and `oci-spec`'s strict types refuse some of it (a descriptor without
//!   `mediaType`, Docker's schema 1 without `config` or `layers`).
//! - [`referrers`] reads the referrers API's answer, which the distribution spec defines
//!   as an OCI image index: with `oci-spec`'s `ImageIndex`, strictly. An answer that is
//!   not one names no referrer to warm.

use serde::Deserialize;

use super::digest::Digest;

/// A platform of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// A descriptor: what a manifest refers to.
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    pub digest: Digest,
    #[serde(default)]
    pub size: u64,
    pub platform: Option<Platform>,
}

/// An image manifest (config + layers) or an index (manifests), read leniently.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl Manifest {
    /// `None` when the bytes are not a manifest berth can read (digests are validated).
    pub fn parse(bytes: &[u8]) -> Option<Manifest> {
        if !is_json_object(bytes) {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    /// Every digest it refers to: config, layers, child manifests.
    pub fn references(&self) -> impl Iterator<Item = &Digest> {
        self.config
            .iter()
            .chain(&self.layers)
            .chain(&self.manifests)
            .map(|d| &d.digest)
    }
}

/// The referrers an OCI referrers answer lists (read strictly with oci-spec); `None` when
/// the bytes are not an OCI image index or a digest is not one berth reads.
pub fn referrers(bytes: &[u8]) -> Option<Vec<Digest>> {
    if !is_json_object(bytes) {
        return None;
    }
    let index: oci_spec::image::ImageIndex = serde_json::from_slice(bytes).ok()?;
    index
        .manifests()
        .iter()
        .map(|d| Digest::parse(d.digest().as_ref()).ok())
        .collect()
}

/// The `mediaType` a manifest names for itself, for registries that send a generic
/// `Content-Type` and for manifests adopted from bare files.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Sniff {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    if !is_json_object(bytes) {
        return None;
    }
    let s: Sniff = serde_json::from_slice(bytes).ok()?;
    s.schema_version?;
    s.media_type
}

/// Whether the document is a JSON object. serde reads a struct from an array as well
/// (`[null, [{"digest": ...}]]` fills `config` and `layers` by position); a manifest is
/// always an object.
fn is_json_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_references_leniently() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"x","config":{{"digest":"{d}","size":1}},"layers":[{{"digest":"{d}"}}],"annotations":{{"a":"b"}}}}"#
        );
        let parsed = Manifest::parse(m.as_bytes()).unwrap();
        assert_eq!(parsed.references().count(), 2);
        assert_eq!(sniff_media_type(m.as_bytes()).as_deref(), Some("x"));
        assert!(Manifest::parse(br#"{"layers":[{"digest":"sha256:nope"}]}"#).is_none());
    }

    #[test]
    fn referrers_answers_are_read_strictly() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let good = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":7,"artifactType":"application/spdx+json"}}]}}"#
        );
        assert_eq!(referrers(good.as_bytes()).unwrap().len(), 1);
        let empty = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(referrers(empty.as_bytes()), Some(vec![]));
        // A descriptor without a size is no referrer (the lenient reader would take it).
        let sizeless = good.replace(r#","size":7"#, "");
        assert!(referrers(sizeless.as_bytes()).is_none());
        assert!(Manifest::parse(sizeless.as_bytes()).is_some());
        assert!(referrers(b"[]").is_none());
        assert!(referrers(b"not json").is_none());
    }

    /// Issue 11 (the `manifest` fuzz target's invariant): serde's derived readers take a
    /// JSON array for a struct, field by position, so an array passed for a manifest with
    /// references, and for an index by its "media type".
    #[test]
    fn a_json_array_is_not_a_manifest() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let array = format!(r#"[null, [{{"digest": "{d}"}}], []]"#);
        assert!(Manifest::parse(array.as_bytes()).is_none());
        let array = br#"["application/vnd.oci.image.index.v1+json", 2]"#;
        assert_eq!(sniff_media_type(array), None);
        // An object is still read, whatever whitespace comes first.
        let object = format!(
            "\r\n\t {}",
            r#"{"schemaVersion":2,"mediaType":"x","layers":[{"digest":"D"}]}"#.replace('D', d)
        );
        let parsed = Manifest::parse(object.as_bytes()).unwrap();
        assert_eq!(parsed.references().count(), 1);
        assert_eq!(sniff_media_type(object.as_bytes()).as_deref(), Some("x"));
    }
}
