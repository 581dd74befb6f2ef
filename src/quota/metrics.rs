//! The quota's metrics, registered here where they are produced: each bucket's tokens,
//! capacity and refill time, what the upstream's rate-limit headers said, and the counted
//! requests sent or refused. The upstream's own account shows as `berth_quota_*{upstream}`
//! (and `berth_upstream_ratelimit_*`); each `[[upstreams.credentials]]` account as
//! `berth_credential_*{upstream,credential}` (`report.rs` picks).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{family, QuotaRefusal, UpstreamLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub upstream: String,
    pub reason: QuotaRefusal,
}

/// A credential's bucket (`[[upstreams.credentials]]`); the upstream's own account keeps
/// the `berth_quota_*{upstream}` series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    pub upstream: String,
    pub credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialRefusalLabels {
    pub upstream: String,
    pub credential: String,
    pub reason: QuotaRefusal,
}

#[derive(Clone, Default)]
pub struct QuotaMetrics {
    pub counted: Family<UpstreamLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub tokens: Family<UpstreamLabels, Gauge>,
    pub capacity: Family<UpstreamLabels, Gauge>,
    pub refill_seconds: Family<UpstreamLabels, Gauge>,
    pub ratelimit_limit: Family<UpstreamLabels, Gauge>,
    pub ratelimit_remaining: Family<UpstreamLabels, Gauge>,
    pub credential_counted: Family<CredentialLabels, Counter>,
    pub credential_refusals: Family<CredentialRefusalLabels, Counter>,
    pub credential_tokens: Family<CredentialLabels, Gauge>,
    pub credential_capacity: Family<CredentialLabels, Gauge>,
    pub credential_refill_seconds: Family<CredentialLabels, Gauge>,
    pub credential_ratelimit_limit: Family<CredentialLabels, Gauge>,
    pub credential_ratelimit_remaining: Family<CredentialLabels, Gauge>,
}

impl QuotaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry;
        QuotaMetrics {
            counted: family(
                r,
                "quota_counted_requests",
                "Upstream requests that spend quota (Docker Hub: manifest GETs), as sent",
                None,
            ),
            refusals: family(
                r,
                "quota_refusals",
                "Counted upstream requests berth did not send, by reason (empty, reserve, cooldown, client)",
                None,
            ),
            tokens: family(
                r,
                "quota_tokens",
                "Tokens left in berth's own bucket for the upstream (whole requests)",
                None,
            ),
            capacity: family(
                r,
                "quota_capacity",
                "The size of berth's bucket for the upstream (configured, or learnt from its headers)",
                None,
            ),
            refill_seconds: family(
                r,
                "quota_refill",
                "Time until the next token (or the end of an upstream 429 cooldown)",
                Some(Unit::Seconds),
            ),
            ratelimit_limit: family(
                r,
                "upstream_ratelimit_limit",
                "The upstream's ratelimit-limit header, as last seen",
                None,
            ),
            ratelimit_remaining: family(
                r,
                "upstream_ratelimit_remaining",
                "The upstream's ratelimit-remaining header, as last seen",
                None,
            ),
            credential_counted: family(
                r,
                "credential_quota_counted_requests",
                "Counted upstream requests sent with one of the upstream's [[upstreams.credentials]], as sent",
                None,
            ),
            credential_refusals: family(
                r,
                "credential_quota_refusals",
                "Counted upstream requests not sent because a credential's bucket said no, by reason (empty, reserve, cooldown)",
                None,
            ),
            credential_tokens: family(
                r,
                "credential_quota_tokens",
                "Tokens left in berth's bucket for one credential of the upstream (whole requests)",
                None,
            ),
            credential_capacity: family(
                r,
                "credential_quota_capacity",
                "The size of berth's bucket for one credential of the upstream",
                None,
            ),
            credential_refill_seconds: family(
                r,
                "credential_quota_refill",
                "Time until the credential's next token (or the end of an upstream 429 cooldown)",
                Some(Unit::Seconds),
            ),
            credential_ratelimit_limit: family(
                r,
                "credential_upstream_ratelimit_limit",
                "The upstream's ratelimit-limit header on answers to requests sent with the credential, as last seen",
                None,
            ),
            credential_ratelimit_remaining: family(
                r,
                "credential_upstream_ratelimit_remaining",
                "The upstream's ratelimit-remaining header on answers to requests sent with the credential, as last seen",
                None,
            ),
        }
    }

    /// A counted request the upstream's own bucket (or a client's budget) refused.
    pub fn refused(&self, upstream: &str, reason: QuotaRefusal) {
        self.refusals
            .get_or_create(&RefusalLabels {
                upstream: upstream.to_owned(),
                reason,
            })
            .inc();
    }
}
