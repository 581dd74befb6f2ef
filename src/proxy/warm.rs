//! Warming: fetch an image ahead of need (every platform, or the configured ones) and pin
//! it against eviction. Used by the warm list in the configuration and by
//! `POST /admin/warm`. It goes through the same policy as a pull, quota included.
//!
//! With signatures, each warmed manifest (the top one and each platform's) also brings
//! what admission controllers check before a pod may start: cosign's
//! `sha256-<hex>.sig` / `.att` / `.sbom` tags and the OCI referrers of the digest, each
//! manifest with its blobs, all pinned, and the referrers list kept and pinned too. An
//! unsigned image (a 404) is normal; it is asked with a HEAD first, which costs nothing.

use std::sync::Arc;

use serde::Serialize;

use super::body::BlobSource;
use super::fill::Status as FillStatus;
use super::listings::Listing;
use super::{internal, Caller, ManifestAnswer, Proxy};
use crate::oci::manifest::{Manifest, Platform};
use crate::oci::ImageRef;
use crate::oci::{self, AcceptSet, Digest, ErrorCode, Reference, Repository, Tag};
use crate::upstream::{Upstream, Upstreams};

/// What warming one image did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WarmReport {
    pub image: String,
    pub ok: bool,
    pub digest: Option<String>,
    pub platforms: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub error: Option<String>,
    /// Signature, attestation and SBOM manifests (cosign's tags) fetched and pinned, when
    /// asked for signatures. Their blobs are counted in `blobs` and `bytes`.
    #[serde(default)]
    pub signatures: usize,
    /// Referrer manifests (the OCI referrers API) fetched and pinned, likewise.
    #[serde(default)]
    pub referrers: usize,
}

/// cosign's tag suffixes: signatures, attestations, SBOMs.
const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];
/// The most referrers of one manifest that are warmed (a long list is a busy CI's, and
/// its oldest entries are rarely what a policy checks).
const MAX_REFERRERS: usize = 256;

/// cosign's tag for `suffix` of `subject`: `sha256-<hex>.sig`. `None` for a digest too
/// long to make a tag of.
fn cosign_tag(subject: &Digest, suffix: &str) -> Option<Tag> {
    Tag::parse(&format!(
        "{}-{}.{suffix}",
        subject.algorithm().as_str(),
        subject.hex()
    ))
    .ok()
}

/// What one warm fetched and must pin.
#[derive(Default)]
struct Fetched {
    pins: Vec<Digest>,
    blobs: usize,
    bytes: u64,
    signatures: usize,
    referrers: usize,
}

/// `linux/amd64` or `linux/arm64/v8` against a descriptor's platform.
fn platform_matches(wanted: &[String], p: Option<&Platform>) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let Some(p) = p else { return false };
    wanted.iter().any(|w| {
        let mut parts = w.split('/');
        parts.next() == Some(p.os.as_str())
            && parts.next() == Some(p.architecture.as_str())
            && parts.next().is_none_or(|v| p.variant.as_deref() == Some(v))
    })
}

impl Proxy {
    /// Warms each image reference (one at a time: warming must not crowd out pulls) and
    /// reports on each; a bad reference or unconfigured host is a failed report.
    pub async fn warm_images(
        &self,
        upstreams: &Upstreams,
        images: &[String],
        platforms: &[String],
        signatures: bool,
    ) -> Vec<WarmReport> {
        let mut reports = Vec::with_capacity(images.len());
        for image in images {
            let result = async {
                let r = ImageRef::parse(image)
                    .map_err(|e| oci::Error::new(ErrorCode::NameInvalid, e.to_string()))?;
                let resolved = upstreams.resolve(None, &r.name)?;
                let (up, repo) = (resolved.upstream, resolved.repo);
                self.warm(&up, &repo, &r.reference, platforms, signatures)
                    .await
            }
            .await;
            reports.push(match result {
                Ok(report) => WarmReport {
                    image: image.clone(),
                    ..report
                },
                Err(e) => WarmReport {
                    image: image.clone(),
                    ok: false,
                    digest: None,
                    platforms: 0,
                    blobs: 0,
                    bytes: 0,
                    error: Some(e.to_string()),
                    signatures: 0,
                    referrers: 0,
                },
            });
        }
        reports
    }

    /// Fetches `reference` and everything it refers to (and, with `signatures`, what is
    /// attached to it), then pins it all.
    pub async fn warm(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        reference: &Reference,
        platforms: &[String],
        signatures: bool,
    ) -> Result<WarmReport, oci::Error> {
        let top = self
            .manifest(up, repo, reference, AcceptSet::ALL, &Caller::default())
            .await?;
        let mut fetched = Fetched::default();
        fetched.pins.push(top.digest.clone());
        let mut subjects = vec![top.digest.clone()];
        let mut images = Vec::new();
        let parsed = Manifest::parse(&top.bytes).ok_or_else(unreadable)?;
        if parsed.manifests.is_empty() {
            images.push(parsed);
        } else {
            for child in parsed.manifests {
                if !platform_matches(platforms, child.platform.as_ref()) {
                    continue;
                }
                let m = self.manifest_by(up, repo, &child.digest).await?;
                fetched.pins.push(child.digest.clone());
                subjects.push(child.digest);
                images.push(Manifest::parse(&m.bytes).ok_or_else(unreadable)?);
            }
        }
        for image in &images {
            self.fetch_blobs(up, repo, image, &mut fetched).await?;
        }
        // The image is pinned before its attachments are asked for: an upstream that
        // fails them fails the report, not the image's pins.
        self.pin(&mut fetched.pins).await?;
        if signatures {
            for subject in &subjects {
                self.warm_attached(up, repo, subject, &mut fetched).await?;
            }
            self.pin(&mut fetched.pins).await?;
        }
        Ok(WarmReport {
            image: String::new(),
            ok: true,
            digest: Some(top.digest.to_string()),
            platforms: images.len(),
            blobs: fetched.blobs,
            bytes: fetched.bytes,
            error: None,
            signatures: fetched.signatures,
            referrers: fetched.referrers,
        })
    }

    async fn pin(&self, pins: &mut Vec<Digest>) -> Result<(), oci::Error> {
        self.store
            .pin(std::mem::take(pins))
            .await
            .map_err(|e| internal("writing the index", e))
    }

    /// A manifest by digest, as warming asks for it (every media type, nobody pays).
    async fn manifest_by(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<ManifestAnswer, oci::Error> {
        let reference = Reference::Digest(digest.clone());
        self.manifest(up, repo, &reference, AcceptSet::ALL, &Caller::default())
            .await
    }

    /// Stores (and marks for pinning) an image manifest's config and layers.
    async fn fetch_blobs(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        image: &Manifest,
        fetched: &mut Fetched,
    ) -> Result<(), oci::Error> {
        for d in image.config.iter().chain(&image.layers) {
            self.ensure_blob(up, repo, &d.digest).await?;
            fetched.pins.push(d.digest.clone());
            fetched.blobs += 1;
            fetched.bytes += d.size;
        }
        Ok(())
    }

    /// cosign's signature, attestation and SBOM tags of `subject`, and its referrers.
    async fn warm_attached(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        subject: &Digest,
        fetched: &mut Fetched,
    ) -> Result<(), oci::Error> {
        for suffix in COSIGN_SUFFIXES {
            let Some(tag) = cosign_tag(subject, suffix) else {
                continue;
            };
            let reference = Reference::Tag(tag);
            // Most images are unsigned: a HEAD (free) says so without a counted GET. An
            // upstream that cannot answer leaves it to the manifest policy (stale copy).
            if let Ok(None) = up.head_manifest(repo, &reference, AcceptSet::ALL).await {
                continue;
            }
            let m = match self
                .manifest(up, repo, &reference, AcceptSet::ALL, &Caller::default())
                .await
            {
                Ok(m) => m,
                Err(e) if e.code == ErrorCode::ManifestUnknown => continue,
                Err(e) => return Err(e),
            };
            self.warm_artifact(up, repo, m, fetched).await?;
            fetched.signatures += 1;
        }
        let listing = Listing::Referrers {
            digest: subject.clone(),
            artifact_type: None,
        };
        // An upstream whose referrers API fails (a 5xx, berth's relay cap) leaves the
        // image warmed with its signatures; the next warm tries again.
        let list = match self.listing(up, repo, listing.clone()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(%subject, error = %e, "referrers not warmed");
                return Ok(());
            }
        };
        // 404: the upstream has no referrers API (distribution 2.x); nothing to warm.
        if list.status != http::StatusCode::OK {
            return Ok(());
        }
        self.pin_listing(up, repo, &listing).await?;
        let referrers = oci::manifest::referrers(&list.body).unwrap_or_else(|| {
            tracing::warn!(%subject, "the upstream's referrers answer is not an OCI image index");
            Vec::new()
        });
        if referrers.len() > MAX_REFERRERS {
            tracing::warn!(%subject, count = referrers.len(), max = MAX_REFERRERS,
                "warming only the first referrers of a manifest");
        }
        for referrer in referrers.into_iter().take(MAX_REFERRERS) {
            let m = self.manifest_by(up, repo, &referrer).await?;
            self.warm_artifact(up, repo, m, fetched).await?;
            fetched.referrers += 1;
        }
        Ok(())
    }

    /// A signature or referrer manifest: its blobs (or, for an index, its manifests and
    /// theirs), all marked for pinning.
    async fn warm_artifact(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        m: ManifestAnswer,
        fetched: &mut Fetched,
    ) -> Result<(), oci::Error> {
        fetched.pins.push(m.digest.clone());
        let parsed = Manifest::parse(&m.bytes).ok_or_else(unreadable)?;
        for child in &parsed.manifests {
            let c = self.manifest_by(up, repo, &child.digest).await?;
            fetched.pins.push(child.digest.clone());
            let image = Manifest::parse(&c.bytes).ok_or_else(unreadable)?;
            self.fetch_blobs(up, repo, &image, fetched).await?;
        }
        self.fetch_blobs(up, repo, &parsed, fetched).await
    }

    /// Makes sure a blob is stored: a hit, or a fill waited on to its end.
    async fn ensure_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(), oci::Error> {
        let answer = self
            .blob(up, repo, digest, false, &Caller::default())
            .await?;
        if let Some(BlobSource::Filling(mut follower)) = answer.source {
            // Warming reads no bytes: a pass-through (disk full) must not wait for it.
            drop(follower.tail);
            let end = follower
                .progress
                .wait_for(|p| matches!(p.status, FillStatus::Done | FillStatus::Failed(_)))
                .await
                .map(|p| p.status.clone());
            match end {
                Ok(FillStatus::Done) => {}
                Ok(FillStatus::Failed(e)) => return Err(e),
                _ => return Err(internal("blob fill", "ended unexpectedly")),
            }
        }
        Ok(())
    }
}

fn unreadable() -> oci::Error {
    oci::Error::new(
        ErrorCode::UpstreamManifestInvalid,
        "manifest berth cannot read",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosign_tags() {
        let d = Digest::sha256_of(b"image");
        assert_eq!(
            cosign_tag(&d, "sig").unwrap().to_string(),
            format!("sha256-{}.sig", d.hex())
        );
    }

    #[test]
    fn platform_filter() {
        let p = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        assert!(platform_matches(&[], Some(&p)));
        assert!(platform_matches(&["linux/arm64".into()], Some(&p)));
        assert!(platform_matches(&["linux/arm64/v8".into()], Some(&p)));
        assert!(!platform_matches(&["linux/arm64/v7".into()], Some(&p)));
        assert!(!platform_matches(&["linux/amd64".into()], Some(&p)));
        assert!(!platform_matches(&["linux/amd64".into()], None));
    }
}
