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

use crate::metrics::{QuotaRefusal, UpstreamLabels};

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
        let counted = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "quota_counted_requests",
            "Upstream requests that spend quota (Docker Hub: manifest GETs), as sent",
            counted.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
        "quota_refusals",
        "Counted upstream requests berth did not send, by reason (empty, reserve, cooldown, client)",
        refusals.clone(),
    );
        let tokens = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "quota_tokens",
            "Tokens left in berth's own bucket for the upstream (whole requests)",
            tokens.clone(),
        );
        let capacity = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "quota_capacity",
            "The size of berth's bucket for the upstream (configured, or learnt from its headers)",
            capacity.clone(),
        );
        let refill_seconds = Family::<UpstreamLabels, Gauge>::default();
        registry.register_with_unit(
            "quota_refill",
            "Time until the next token (or the end of an upstream 429 cooldown)",
            Unit::Seconds,
            refill_seconds.clone(),
        );
        let ratelimit_limit = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_limit",
            "The upstream's ratelimit-limit header, as last seen",
            ratelimit_limit.clone(),
        );
        let ratelimit_remaining = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_remaining",
            "The upstream's ratelimit-remaining header, as last seen",
            ratelimit_remaining.clone(),
        );
        let credential_counted = Family::<CredentialLabels, Counter>::default();
        registry.register(
        "credential_quota_counted_requests",
        "Counted upstream requests sent with one of the upstream's [[upstreams.credentials]], as sent",
        credential_counted.clone(),
    );
        let credential_refusals = Family::<CredentialRefusalLabels, Counter>::default();
        registry.register(
        "credential_quota_refusals",
        "Counted upstream requests not sent because a credential's bucket said no, by reason (empty, reserve, cooldown)",
        credential_refusals.clone(),
    );
        let credential_tokens = Family::<CredentialLabels, Gauge>::default();
        registry.register(
            "credential_quota_tokens",
            "Tokens left in berth's bucket for one credential of the upstream (whole requests)",
            credential_tokens.clone(),
        );
        let credential_capacity = Family::<CredentialLabels, Gauge>::default();
        registry.register(
            "credential_quota_capacity",
            "The size of berth's bucket for one credential of the upstream",
            credential_capacity.clone(),
        );
        let credential_refill_seconds = Family::<CredentialLabels, Gauge>::default();
        registry.register_with_unit(
            "credential_quota_refill",
            "Time until the credential's next token (or the end of an upstream 429 cooldown)",
            Unit::Seconds,
            credential_refill_seconds.clone(),
        );
        let credential_ratelimit_limit = Family::<CredentialLabels, Gauge>::default();
        registry.register(
        "credential_upstream_ratelimit_limit",
        "The upstream's ratelimit-limit header on answers to requests sent with the credential, as last seen",
        credential_ratelimit_limit.clone(),
    );
        let credential_ratelimit_remaining = Family::<CredentialLabels, Gauge>::default();
        registry.register(
        "credential_upstream_ratelimit_remaining",
        "The upstream's ratelimit-remaining header on answers to requests sent with the credential, as last seen",
        credential_ratelimit_remaining.clone(),
    );
        QuotaMetrics {
            counted,
            refusals,
            tokens,
            capacity,
            refill_seconds,
            ratelimit_limit,
            ratelimit_remaining,
            credential_counted,
            credential_refusals,
            credential_tokens,
            credential_capacity,
            credential_refill_seconds,
            credential_ratelimit_limit,
            credential_ratelimit_remaining,
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
