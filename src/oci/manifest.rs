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
    let s: Sniff = serde_json::from_slice(bytes).ok()?;
    s.schema_version?;
    s.media_type
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
}
