//! Admission at accept: the connection cap of a listener and, optionally, of each client
//! address. A refused connection is closed at once (clients retry; a flood learns
//! nothing), counted, and logged at most once per ten seconds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::stack::{ReasonLabel, ServerMetrics};
use super::{Limits, Role};

type PerClient = Arc<Mutex<HashMap<IpAddr, usize>>>;

pub struct Gate {
    total: Arc<Semaphore>,
    max: usize,
    per_client: Option<(usize, PerClient)>,
    metrics: ServerMetrics,
    role: Role,
    last_warned: Mutex<Option<Instant>>,
}

/// A connection's place: given back when the connection ends.
pub struct Pass {
    _permit: OwnedSemaphorePermit,
    client: Option<(IpAddr, PerClient)>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some((ip, map)) = &self.client {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
    }
}

impl Gate {
    pub fn new(limits: &Limits, metrics: ServerMetrics, role: Role) -> Gate {
        Gate {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            max: limits.max_connections,
            per_client: limits
                .max_connections_per_client
                .map(|n| (n, Arc::new(Mutex::new(HashMap::new())))),
            metrics,
            role,
            last_warned: Mutex::new(None),
        }
    }

    pub fn admit(&self, ip: IpAddr) -> Option<Pass> {
        let Ok(permit) = self.total.clone().try_acquire_owned() else {
            self.refuse(ip, "max_connections", self.max);
            return None;
        };
        let client = match &self.per_client {
            None => None,
            Some((cap, map)) => {
                let mut held = map.lock().unwrap_or_else(|p| p.into_inner());
                let n = held.entry(ip).or_insert(0);
                if *n >= *cap {
                    drop(held);
                    self.refuse(ip, "max_connections_per_client", *cap);
                    return None;
                }
                *n += 1;
                Some((ip, map.clone()))
            }
        };
        Some(Pass {
            _permit: permit,
            client,
        })
    }

    fn refuse(&self, ip: IpAddr, reason: &'static str, max: usize) {
        self.metrics
            .connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(role = ?self.role, client = %ip, limit = reason, max,
                "connection refused at its limit (logged at most every 10 s; counted in \
                 berth_connections_refused_total)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, per_client: Option<usize>) -> Gate {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(1),
            max_connections: max,
            max_connections_per_client: per_client,
        };
        Gate::new(&limits, ServerMetrics::default(), Role::Api)
    }

    #[test]
    fn one_client_cannot_take_every_place() {
        let g = gate(10, Some(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = g.admit(a).unwrap();
        let _second = g.admit(a).unwrap();
        assert!(g.admit(a).is_none());
        assert!(g.admit(b).is_some());
        drop(first);
        assert!(g.admit(a).is_some());
    }

    #[test]
    fn the_listener_cap_holds_and_frees() {
        let g = gate(2, None);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..2).map(|_| g.admit(ip).unwrap()).collect();
        assert!(g.admit(ip).is_none());
        drop(held);
        assert!(g.admit(ip).is_some());
    }
}
