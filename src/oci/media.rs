//! Manifest media types and the client's `Accept` set.

/// Manifest media types berth knows. Others are passed through verbatim but not negotiated.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

const KNOWN: [&str; 5] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    DOCKER_V1_SIGNED,
];

/// Manifests larger than this are refused (distribution uses the same limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// The set of manifest media types a client accepts, as a bit set over [`KNOWN`].
///
/// The set is part of a tag's cache key: a client that accepts only single-platform
/// manifests must not be answered with an index fetched for one that accepts indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AcceptSet(u8);

impl AcceptSet {
    /// Everything berth knows: what berth asks upstream for when the client says nothing
    /// more specific. A client without `Accept` (or with `*/*`) gets the registry default.
    pub const ALL: AcceptSet = AcceptSet((1 << KNOWN.len()) - 1);

    /// Parses every `Accept` header value of a request.
    pub fn from_headers<'a>(values: impl Iterator<Item = &'a str>) -> Self {
        let mut bits = 0u8;
        let mut any = false;
        for value in values {
            for item in value.split(',') {
                let mt = item.split(';').next().unwrap_or("").trim();
                if mt.is_empty() {
                    continue;
                }
                any = true;
                if mt == "*/*" || mt == "application/*" {
                    return AcceptSet::ALL;
                }
                if let Some(i) = KNOWN.iter().position(|k| k.eq_ignore_ascii_case(mt)) {
                    bits |= 1 << i;
                }
            }
        }
        // No Accept at all, or only types berth does not know: registries answer with
        // their default, so ask for everything and do not filter.
        if !any || bits == 0 {
            AcceptSet::ALL
        } else {
            AcceptSet(bits)
        }
    }

    pub fn accepts(self, media_type: &str) -> bool {
        match KNOWN
            .iter()
            .position(|k| k.eq_ignore_ascii_case(media_type))
        {
            Some(i) => self.0 & (1 << i) != 0,
            // A type berth does not know cannot be negotiated; pass it through.
            None => true,
        }
    }

    /// The media types, for an upstream `Accept` header.
    pub fn media_types(self) -> impl Iterator<Item = &'static str> {
        KNOWN
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, k)| *k)
    }

    /// A stable short form for index keys.
    pub fn key(self) -> u8 {
        self.0
    }

    /// The set an index key stands for; `None` for bits berth does not know.
    pub fn from_key(key: u8) -> Option<Self> {
        (key != 0 && key & !AcceptSet::ALL.0 == 0).then_some(AcceptSet(key))
    }

    /// Whether every type `other` accepts, this set accepts too.
    pub fn contains(self, other: AcceptSet) -> bool {
        self.0 & other.0 == other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The media types berth negotiates are spelt as `oci-spec` spells them (berth keeps
    /// them as constants: the Accept bit set is built from a const array).
    #[test]
    fn media_types_match_oci_spec() {
        use oci_spec::image::MediaType;
        assert_eq!(MediaType::ImageManifest.to_string(), OCI_MANIFEST);
        assert_eq!(MediaType::ImageIndex.to_string(), OCI_INDEX);
    }

    #[test]
    fn containerd_accept() {
        let a = AcceptSet::from_headers(
            [
                "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
            ]
            .into_iter(),
        );
        assert_eq!(a, AcceptSet::ALL);
        let only = AcceptSet::from_headers([DOCKER_MANIFEST].into_iter());
        assert!(only.accepts(DOCKER_MANIFEST));
        assert!(!only.accepts(OCI_INDEX));
        assert_eq!(AcceptSet::from_headers(std::iter::empty()), AcceptSet::ALL);
        assert!(AcceptSet::ALL.contains(only));
        assert!(!only.contains(AcceptSet::ALL));
        assert_eq!(AcceptSet::from_key(only.key()), Some(only));
        assert_eq!(AcceptSet::from_key(0), None);
    }
}
