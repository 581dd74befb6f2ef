//! How a bucket shows in the metrics: the upstream's own account in the
//! `berth_quota_*{upstream}` (and `berth_upstream_ratelimit_*`) series, as always, and
//! each `[[upstreams.credentials]]` account in the `berth_credential_*{upstream,
//! credential}` series. The one place that picks between the two.

use prometheus_client::metrics::gauge::Gauge;

use super::metrics::{CredentialLabels, CredentialRefusalLabels};
use crate::metrics::{Metrics, QuotaRefusal, UpstreamLabels};

/// Whose bucket: an upstream's own account (`credential: None`) or one of its
/// `[[upstreams.credentials]]` entries, by name.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct BucketId {
    pub upstream: String,
    pub credential: Option<String>,
}

impl BucketId {
    fn upstream_labels(&self) -> UpstreamLabels {
        UpstreamLabels {
            upstream: self.upstream.clone(),
        }
    }

    fn credential_labels(&self, credential: &str) -> CredentialLabels {
        CredentialLabels {
            upstream: self.upstream.clone(),
            credential: credential.to_owned(),
        }
    }
}

fn set(gauge: &Gauge, value: u64) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

/// A counted request sent with the bucket's account.
pub(super) fn counted(metrics: &Metrics, id: &BucketId) {
    match &id.credential {
        None => metrics
            .quota
            .counted
            .get_or_create(&id.upstream_labels())
            .inc(),
        Some(c) => metrics
            .quota
            .credential_counted
            .get_or_create(&id.credential_labels(c))
            .inc(),
    };
}

/// A counted request the bucket refused.
pub(super) fn refused(metrics: &Metrics, id: &BucketId, reason: QuotaRefusal) {
    match &id.credential {
        None => metrics.quota.refused(&id.upstream, reason),
        Some(c) => {
            metrics
                .quota
                .credential_refusals
                .get_or_create(&CredentialRefusalLabels {
                    upstream: id.upstream.clone(),
                    credential: c.clone(),
                    reason,
                })
                .inc();
        }
    }
}

/// Tokens and capacity (when limited), and the time to the next token.
pub(super) fn gauges(
    metrics: &Metrics,
    id: &BucketId,
    tokens_capacity: Option<(u64, u64)>,
    refill_seconds: u64,
) {
    match &id.credential {
        None => {
            let labels = id.upstream_labels();
            if let Some((tokens, capacity)) = tokens_capacity {
                set(&metrics.quota.tokens.get_or_create(&labels), tokens);
                set(&metrics.quota.capacity.get_or_create(&labels), capacity);
            }
            set(
                &metrics.quota.refill_seconds.get_or_create(&labels),
                refill_seconds,
            );
        }
        Some(c) => {
            let labels = id.credential_labels(c);
            if let Some((tokens, capacity)) = tokens_capacity {
                set(
                    &metrics.quota.credential_tokens.get_or_create(&labels),
                    tokens,
                );
                set(
                    &metrics.quota.credential_capacity.get_or_create(&labels),
                    capacity,
                );
            }
            set(
                &metrics
                    .quota
                    .credential_refill_seconds
                    .get_or_create(&labels),
                refill_seconds,
            );
        }
    }
}

/// What the upstream's `ratelimit-limit` / `ratelimit-remaining` told the bucket's account.
pub(super) fn ratelimit(
    metrics: &Metrics,
    id: &BucketId,
    limit: Option<u64>,
    remaining: Option<u64>,
) {
    match &id.credential {
        None => {
            let labels = id.upstream_labels();
            if let Some(v) = limit {
                set(&metrics.quota.ratelimit_limit.get_or_create(&labels), v);
            }
            if let Some(v) = remaining {
                set(&metrics.quota.ratelimit_remaining.get_or_create(&labels), v);
            }
        }
        Some(c) => {
            let labels = id.credential_labels(c);
            if let Some(v) = limit {
                set(
                    &metrics
                        .quota
                        .credential_ratelimit_limit
                        .get_or_create(&labels),
                    v,
                );
            }
            if let Some(v) = remaining {
                set(
                    &metrics
                        .quota
                        .credential_ratelimit_remaining
                        .get_or_create(&labels),
                    v,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::CountedRequest;
    use crate::quota::{Purpose, Quota};

    #[test]
    fn a_credential_bucket_reports_under_its_name_only() {
        let metrics = Arc::new(Metrics::new());
        let id = BucketId {
            upstream: "docker.io".into(),
            credential: Some("myorg".into()),
        };
        let q = Quota::for_account(id, None, vec![CountedRequest::ManifestGet], metrics.clone());
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-limit", "200;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "150;w=21600".parse().unwrap());
        q.observe(&h);
        q.acquire(Purpose::New).unwrap();
        q.spent();
        let text = metrics.encode_classic();
        let l = "{upstream=\"docker.io\",credential=\"myorg\"}";
        for sample in [
            format!("berth_credential_quota_counted_requests_total{l} 1"),
            format!("berth_credential_quota_tokens{l} 149"),
            format!("berth_credential_quota_capacity{l} 200"),
            format!("berth_credential_upstream_ratelimit_remaining{l} 150"),
        ] {
            assert!(text.contains(&sample), "{sample} missing:\n{text}");
        }
        // The upstream's own series stay the default account's.
        assert!(
            !text.contains("berth_quota_tokens{upstream=\"docker.io\"}"),
            "{text}"
        );
        assert!(
            !text.contains("berth_quota_counted_requests_total{"),
            "{text}"
        );
    }
}
