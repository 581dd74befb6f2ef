//! The few fields of a manifest or index that berth reads. Everything else is kept
//! verbatim: berth stores and serves the upstream's exact bytes.

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
