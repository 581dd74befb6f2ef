//! Warming: fetch an image ahead of need (every platform, or the configured ones) and pin
//! it against eviction. Used by the warm list in the configuration and by
//! `POST /admin/warm`. It goes through the same policy as a pull, quota included.

use std::sync::Arc;

use serde::Serialize;

use super::body::BlobSource;
use super::fill::Status as FillStatus;
use super::{internal, Proxy};
use crate::oci::manifest::{Manifest, Platform};
use crate::oci::ImageRef;
use crate::oci::{self, AcceptSet, Digest, ErrorCode, Reference, Repository};
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
    ) -> Vec<WarmReport> {
        let mut reports = Vec::with_capacity(images.len());
        for image in images {
            let result = async {
                let r = ImageRef::parse(image)
                    .map_err(|e| oci::Error::new(ErrorCode::NameInvalid, e.to_string()))?;
                let (up, repo) = upstreams.resolve(None, &r.name)?;
                self.warm(&up, &repo, &r.reference, platforms).await
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
                },
            });
        }
        reports
    }

    /// Fetches `reference` and everything it refers to, then pins it all.
    pub async fn warm(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        reference: &Reference,
        platforms: &[String],
    ) -> Result<WarmReport, oci::Error> {
        let top = self
            .manifest(
                up,
                repo,
                reference,
                AcceptSet::ALL,
                &super::Caller::default(),
            )
            .await?;
        let mut pins = vec![top.digest.clone()];
        let mut images = Vec::new();
        let unreadable = || {
            oci::Error::new(
                ErrorCode::UpstreamManifestInvalid,
                "manifest berth cannot read",
            )
        };
        let parsed = Manifest::parse(&top.bytes).ok_or_else(unreadable)?;
        if parsed.manifests.is_empty() {
            images.push(parsed);
        } else {
            for child in parsed.manifests {
                if !platform_matches(platforms, child.platform.as_ref()) {
                    continue;
                }
                let m = self
                    .manifest(
                        up,
                        repo,
                        &Reference::Digest(child.digest.clone()),
                        AcceptSet::ALL,
                        &super::Caller::default(),
                    )
                    .await?;
                pins.push(child.digest);
                images.push(Manifest::parse(&m.bytes).ok_or_else(unreadable)?);
            }
        }
        let (mut blobs, mut bytes) = (0, 0);
        for image in &images {
            for d in image.config.iter().chain(&image.layers) {
                self.ensure_blob(up, repo, &d.digest).await?;
                pins.push(d.digest.clone());
                blobs += 1;
                bytes += d.size;
            }
        }
        self.store
            .pin(pins)
            .await
            .map_err(|e| internal("writing the index", e))?;
        Ok(WarmReport {
            image: String::new(),
            ok: true,
            digest: Some(top.digest.to_string()),
            platforms: images.len(),
            blobs,
            bytes,
            error: None,
        })
    }

    /// Makes sure a blob is stored: a hit, or a fill waited on to its end.
    async fn ensure_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(), oci::Error> {
        let answer = self
            .blob(up, repo, digest, false, &super::Caller::default())
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

#[cfg(test)]
mod tests {
    use super::*;

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
