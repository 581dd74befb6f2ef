//! The fields of a manifest or index berth reads (`src/oci/manifest.rs`): the digests it
//! refers to (which become fetches and store keys) and the media type it names.
//!
//! Input: the manifest bytes as an upstream sent them.
//! Invariants: only a JSON object is read; every digest referred to is a valid digest that
//! prints back to what the document says; the sniffed media type is the document's own.

#![no_main]

use berth::oci::manifest::{sniff_media_type, Manifest};
use berth::oci::Digest;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let manifest = Manifest::parse(data);
    let media_type = sniff_media_type(data);
    if manifest.is_none() && media_type.is_none() {
        return;
    }
    // serde reads a struct from an array too; a manifest is an object.
    let first = data.iter().find(|b| !b" \t\r\n".contains(b));
    assert_eq!(first, Some(&b'{'), "read a document that is not an object");

    if let Some(m) = &manifest {
        let refs: Vec<&Digest> = m.references().collect();
        assert_eq!(
            refs.len(),
            usize::from(m.config.is_some()) + m.layers.len() + m.manifests.len()
        );
        for d in refs {
            assert_eq!(Digest::parse(&d.to_string()).as_ref(), Ok(d));
        }
    }

    // The same document read whole, to compare with what berth read. serde_json skips the
    // fields berth does not read without checking them fully (invalid UTF-8 in strings,
    // numbers beyond f64): berth keeps the bytes verbatim and checks only their digest.
    // Mend the strings; a document with such a number cannot be read whole.
    let Ok(doc) = serde_json::from_str::<Value>(&String::from_utf8_lossy(data)) else {
        return;
    };
    if let Some(m) = &manifest {
        let listed = |key: &str| doc.get(key).and_then(Value::as_array).map_or(0, Vec::len);
        assert_eq!(m.layers.len(), listed("layers"));
        assert_eq!(m.manifests.len(), listed("manifests"));
        let digest_at = |v: &Value| v["digest"].as_str().map(str::to_owned);
        if let Some(config) = &m.config {
            assert_eq!(digest_at(&doc["config"]), Some(config.digest.to_string()));
        }
        for (i, layer) in m.layers.iter().enumerate() {
            assert_eq!(digest_at(&doc["layers"][i]), Some(layer.digest.to_string()));
        }
        for (i, child) in m.manifests.iter().enumerate() {
            assert_eq!(
                digest_at(&doc["manifests"][i]),
                Some(child.digest.to_string())
            );
        }
    }
    if let Some(mt) = &media_type {
        assert_eq!(doc["mediaType"].as_str(), Some(mt.as_str()));
        assert!(doc["schemaVersion"].is_u64());
    }
});
