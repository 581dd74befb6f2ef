//! Per-client budgets: a small token bucket per client (its address, or the value of a
//! configured header) for the counted upstream requests its pulls cause, so one noisy CI
//! job cannot spend the whole cluster's quota. Off unless `[client_budgets]` is set.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName};

use super::bucket::Denied;
use crate::config::ClientBudgetConfig;
use crate::metrics::QuotaRefusal;

/// How clients are told apart.
#[derive(Debug, Clone)]
pub enum BudgetKey {
    Address,
    Header(HeaderName),
}

pub struct Budgets {
    key: BudgetKey,
    capacity: f64,
    per: Duration,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Past this many clients, buckets that have refilled completely are forgotten.
const MAX_CLIENTS: usize = 100_000;

impl Budgets {
    pub fn new(config: &ClientBudgetConfig) -> Self {
        let key = match config.key.strip_prefix("header:") {
            Some(h) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => BudgetKey::Header(name),
                // Validated with the configuration; an address key is the safe fallback.
                Err(_) => BudgetKey::Address,
            },
            None => BudgetKey::Address,
        };
        Budgets {
            key,
            capacity: f64::from(config.requests),
            per: config.per,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Who a request is from: the configured header's value, or its address.
    pub fn client_of(&self, headers: &HeaderMap, peer: IpAddr) -> String {
        match &self.key {
            BudgetKey::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| format!("{name}={v:.128}"))
                .unwrap_or_else(|| peer.to_string()),
            BudgetKey::Address => peer.to_string(),
        }
    }

    fn refill(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (tokens + elapsed * self.capacity / self.per.as_secs_f64()).min(self.capacity)
    }

    pub fn acquire(&self, client: &str) -> Result<(), Denied> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(client) {
            buckets.retain(|_, (t, since)| self.refill(*t, *since, now) < self.capacity);
        }
        let entry = buckets
            .entry(client.to_owned())
            .or_insert((self.capacity, now));
        let tokens = self.refill(entry.0, entry.1, now);
        if tokens >= 1.0 {
            *entry = (tokens - 1.0, now);
            Ok(())
        } else {
            *entry = (tokens, now);
            let per_token = self.per.as_secs_f64() / self.capacity;
            Err(Denied {
                reason: QuotaRefusal::Client,
                remaining: 0,
                retry_after: super::bucket::secs((1.0 - tokens) * per_token),
            })
        }
    }

    /// Gives a token back when the upstream request it paid for was not made.
    pub fn refund(&self, client: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = buckets.get_mut(client) {
            entry.0 = (entry.0 + 1.0).min(self.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bucket_per_client() {
        let b = Budgets::new(&ClientBudgetConfig {
            key: "header:x-team".into(),
            requests: 2,
            per: Duration::from_secs(3600),
        });
        let mut h = HeaderMap::new();
        h.insert("x-team", "ci".parse().unwrap());
        let ci = b.client_of(&h, "10.0.0.1".parse().unwrap());
        let other = b.client_of(&HeaderMap::new(), "10.0.0.1".parse().unwrap());
        assert_ne!(ci, other);
        b.acquire(&ci).unwrap();
        b.acquire(&ci).unwrap();
        assert_eq!(b.acquire(&ci).unwrap_err().reason, QuotaRefusal::Client);
        b.acquire(&other).unwrap();
        b.refund(&ci);
        b.acquire(&ci).unwrap();
    }
}
