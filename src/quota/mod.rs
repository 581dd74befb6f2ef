//! Spending an upstream's pull quota: every decision in one place, behind one call.
//!
//! Two kinds of bucket decide whether a counted request (by default a manifest GET; the
//! upstream's `quota.counts` says which) may go upstream: the upstream's own ([`Quota`]:
//! its cap, its reserve for images berth has never seen, the cooldown after a 429, what
//! the rate-limit headers say, this replica's share in a fleet), and, when configured,
//! the per-client budget of the client whose pull causes the request ([`Budgets`]).
//! [`Ledger::charge`] asks both, in that order of cheapness, and returns a [`Charge`]
//! that is settled once the request is made: a request that never reached the upstream
//! gives both tokens back. Nothing else in berth takes or returns a token.
//!
//! The upstream client calls it for every request it sends; `proxy` only says who pays
//! and for what ([`Payer`]).

mod bucket;
mod budgets;
mod metrics;
mod report;

use std::sync::Arc;

pub use bucket::{secs, Denied, Purpose, Quota, QuotaSnapshot};
pub use budgets::Budgets;
pub use metrics::{CredentialLabels, CredentialRefusalLabels, QuotaMetrics, RefusalLabels};
pub use report::BucketId;

use crate::config::{ClientBudgetConfig, CountedRequest};
use crate::metrics::Metrics;

/// Who pays for the requests one pull causes, and what for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payer {
    pub purpose: Purpose,
    /// The client, when per-client budgets are on (else `None`, and nobody's budget is
    /// charged).
    pub client: Option<String>,
}

impl Payer {
    pub fn new(purpose: Purpose, client: Option<String>) -> Self {
        Payer { purpose, client }
    }

    /// Requests berth makes on its own account (warming, authorising a hit).
    pub fn berth(purpose: Purpose) -> Self {
        Payer {
            purpose,
            client: None,
        }
    }
}

/// The per-client budgets shared by every upstream.
pub struct Ledger {
    budgets: Option<Budgets>,
    metrics: Arc<Metrics>,
}

/// A token taken for one counted request; give it to [`Charge::settle`].
#[must_use = "a charge must be settled: refunded if the request never reached the upstream"]
pub struct Charge<'a> {
    quota: &'a Quota,
    budget: Option<(&'a Budgets, String)>,
    settled: bool,
}

impl Ledger {
    pub fn new(config: Option<&ClientBudgetConfig>, metrics: Arc<Metrics>) -> Self {
        Ledger {
            budgets: config.map(Budgets::new),
            metrics,
        }
    }

    /// Who a request is from, when per-client budgets are on.
    pub fn client_of(&self, headers: &http::HeaderMap, peer: std::net::IpAddr) -> Option<String> {
        self.budgets.as_ref().map(|b| b.client_of(headers, peer))
    }

    /// The one call: may a `request` to the upstream whose bucket is `quota` go out, paid
    /// by `payer`? `Ok(None)`: the upstream does not count it. A refusal is counted by
    /// reason and names when to retry.
    pub fn charge<'a>(
        &'a self,
        quota: &'a Quota,
        upstream: &str,
        request: CountedRequest,
        payer: &Payer,
    ) -> Result<Option<Charge<'a>>, Denied> {
        if !quota.counts(request) {
            return Ok(None);
        }
        let budget = match (&self.budgets, &payer.client) {
            (Some(b), Some(client)) => {
                if let Err(denied) = b.acquire(client) {
                    self.metrics.quota.refused(upstream, denied.reason);
                    return Err(denied);
                }
                Some((b, client.clone()))
            }
            _ => None,
        };
        if let Err(denied) = quota.acquire(payer.purpose) {
            // The upstream's bucket said no: the client spent nothing.
            if let Some((b, client)) = &budget {
                b.refund(client);
            }
            return Err(denied);
        }
        Ok(Some(Charge {
            quota,
            budget,
            settled: false,
        }))
    }
}

impl Charge<'_> {
    /// The request was sent: a token is spent if it reached the upstream, and given back
    /// to both buckets if it did not (no connection, refused before sending).
    pub fn settle(mut self, reached_upstream: bool) {
        self.settled = true;
        if reached_upstream {
            self.quota.spent();
        } else {
            self.quota.refund();
            if let Some((b, client)) = &self.budget {
                b.refund(client);
            }
        }
    }
}

impl Drop for Charge<'_> {
    /// A request abandoned before it was settled (its client went away mid-request) may
    /// have reached the upstream: counted as spent, never silently lost.
    fn drop(&mut self) {
        if !self.settled {
            self.quota.spent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QuotaConfig;
    use crate::metrics::QuotaRefusal;
    use std::time::Duration;

    fn setup(budget: u32, cap: u32) -> (Ledger, Quota) {
        let metrics = Arc::new(Metrics::new());
        let ledger = Ledger::new(
            Some(&ClientBudgetConfig {
                key: "address".into(),
                requests: budget,
                per: Duration::from_secs(3600),
            }),
            metrics.clone(),
        );
        let quota = Quota::new(
            "docker.io",
            Some(QuotaConfig {
                requests: cap,
                per: Duration::from_secs(3600),
                reserve: 0.0,
                counts: Some(vec![CountedRequest::ManifestGet, CountedRequest::BlobGet]),
            }),
            vec![CountedRequest::ManifestGet],
            metrics,
        );
        (ledger, quota)
    }

    #[test]
    fn both_buckets_pay_and_refunds_reach_both() {
        let (ledger, quota) = setup(2, 10);
        let ci = Payer::new(Purpose::New, Some("10.0.0.1".into()));
        let c = ledger
            .charge(&quota, "docker.io", CountedRequest::ManifestGet, &ci)
            .unwrap()
            .unwrap();
        c.settle(false); // never sent: the client keeps its token
        for _ in 0..2 {
            ledger
                .charge(&quota, "docker.io", CountedRequest::ManifestGet, &ci)
                .unwrap()
                .unwrap()
                .settle(true);
        }
        let refused = ledger
            .charge(&quota, "docker.io", CountedRequest::ManifestGet, &ci)
            .err()
            .unwrap();
        assert_eq!(refused.reason, QuotaRefusal::Client);
        // Counted blob GETs are charged to the client too (they used not to be).
        let other = Payer::new(Purpose::New, Some("10.0.0.2".into()));
        for _ in 0..2 {
            ledger
                .charge(&quota, "docker.io", CountedRequest::BlobGet, &other)
                .unwrap()
                .unwrap()
                .settle(true);
        }
        assert!(ledger
            .charge(&quota, "docker.io", CountedRequest::BlobGet, &other)
            .is_err());
        // Not counted by this upstream: nobody pays.
        assert!(ledger
            .charge(&quota, "docker.io", CountedRequest::BlobHead, &other)
            .unwrap()
            .is_none());
        assert_eq!(quota.snapshot().tokens, Some(6));
    }

    #[test]
    fn an_empty_upstream_bucket_costs_the_client_nothing() {
        let (ledger, quota) = setup(5, 1);
        let ci = Payer::new(Purpose::New, Some("ci".into()));
        ledger
            .charge(&quota, "docker.io", CountedRequest::ManifestGet, &ci)
            .unwrap()
            .unwrap()
            .settle(true);
        let refused = ledger
            .charge(&quota, "docker.io", CountedRequest::ManifestGet, &ci)
            .err()
            .unwrap();
        assert_eq!(refused.reason, QuotaRefusal::Empty);
        // The client still has 4 of its 5 tokens.
        let metrics = Arc::new(Metrics::new());
        let roomy = Quota::new("x", None, vec![CountedRequest::ManifestGet], metrics);
        for _ in 0..4 {
            ledger
                .charge(&roomy, "x", CountedRequest::ManifestGet, &ci)
                .unwrap()
                .unwrap()
                .settle(true);
        }
        assert!(ledger
            .charge(&roomy, "x", CountedRequest::ManifestGet, &ci)
            .is_err());
    }
}
