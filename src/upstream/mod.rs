//! Outbound: one client per upstream registry, and the routing table that decides which
//! upstream a request is for.
//!
//! This module speaks the registry protocol (auth challenges, tokens, redirects, timeouts)
//! and knows nothing of the store or of caching policy: `proxy` decides *whether* to ask,
//! this module only asks.

mod account;
pub(crate) mod auth;
mod client;
mod credentials;
pub mod egress;
mod error;
pub(crate) mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

pub use client::{BlobResponse, ManifestHead, ManifestResponse, Outbound, Passthrough, Upstream};
pub use credentials::Credentials;
pub use error::Error;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::oci::{self, ErrorCode, Repository};
use crate::quota::Ledger;

/// The configured upstreams by host and alias.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    all: Vec<Arc<Upstream>>,
    default: Arc<Upstream>,
    ledger: Arc<Ledger>,
}

impl Upstreams {
    pub fn from_config(
        config: &Config,
        metrics: Arc<Metrics>,
        egress: egress::EgressMetrics,
    ) -> Result<Self, ConfigError> {
        let outbound = Outbound {
            listeners: vec![config.server.listen, config.server.admin_listen],
            metrics: egress,
        };
        let mut by_name = HashMap::new();
        let mut all = Vec::new();
        let ledger = Arc::new(Ledger::new(config.client_budgets.as_ref(), metrics.clone()));
        for u in &config.upstreams {
            let upstream = Arc::new(Upstream::new(
                u,
                metrics.clone(),
                ledger.clone(),
                &outbound,
            )?);
            for name in std::iter::once(&u.host).chain(&u.aliases) {
                by_name.insert(name.to_ascii_lowercase(), upstream.clone());
            }
            all.push(upstream);
        }
        let default = by_name
            .get(&config.routing.default_upstream.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| ConfigError("routing.default_upstream is not configured".into()))?;
        Ok(Upstreams {
            by_name,
            all,
            default,
            ledger,
        })
    }

    /// Splits every upstream's quota (each account's bucket) across a fleet of `replicas`.
    pub fn share_quota(&self, replicas: usize) {
        for u in &self.all {
            for (_, quota) in u.quotas() {
                quota.share(replicas);
            }
        }
    }

    /// Who pays for counted requests (per-client budgets, shared by every upstream).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.all
    }

    pub fn get(&self, host: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(&host.to_ascii_lowercase())
    }

    /// Decides the upstream and repository of a request: `?ns=` first, then a first path
    /// segment naming a configured host, then the default upstream. A host that is not
    /// configured is refused: berth never fetches from an address a client chose.
    pub fn resolve(&self, ns: Option<&str>, name: &str) -> Result<Resolved, oci::Error> {
        let unknown = |host: &str| {
            oci::Error::new(
                ErrorCode::NameUnknown,
                format!(
                    "upstream {} is not configured on this berth",
                    crate::oci::Quoted(host, 100)
                ),
            )
        };
        let (upstream, name, prefix) = match ns {
            Some(host) => (
                self.get(host).ok_or_else(|| unknown(host))?.clone(),
                name,
                None,
            ),
            None => match name.split_once('/') {
                Some((first, rest)) if looks_like_host(first) => (
                    self.get(first).ok_or_else(|| unknown(first))?.clone(),
                    rest,
                    Some(first.to_owned()),
                ),
                _ => (self.default.clone(), name, None),
            },
        };
        let invalid =
            |e: crate::oci::InvalidName| oci::Error::new(ErrorCode::NameInvalid, e.to_string());
        let repo = Repository::parse(name).map_err(invalid)?;
        let repo = if upstream.is_docker_hub() {
            repo.with_library_prefix().map_err(invalid)?
        } else {
            repo
        };
        Ok(Resolved {
            upstream,
            repo,
            prefix,
        })
    }
}

/// Which upstream and repository a request is for.
pub struct Resolved {
    pub upstream: Arc<Upstream>,
    pub repo: Repository,
    /// The host a path-prefix client put before the name (`/v2/ghcr.io/org/app/...`), as
    /// it wrote it; links berth relays must carry it, or the next page goes elsewhere.
    pub prefix: Option<String>,
}

/// Docker's rule for "the first component is a registry host".
fn looks_like_host(segment: &str) -> bool {
    segment.contains('.') || segment.contains(':') || segment == "localhost"
}
