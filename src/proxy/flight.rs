//! Single flight: however many callers ask for the same key at once, one task does the
//! work and every caller gets its result.
//!
//! The work runs in its own task, so it finishes (and its result is stored) even when the
//! caller that started it goes away.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub struct Flights<K, V> {
    inflight: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// Whether a caller did the work or waited for another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// Removes a flight's key from the map when dropped, whether the work ended or panicked.
struct Leave<K: Hash + Eq, V> {
    inflight: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
    key: K,
}

impl<K: Hash + Eq, V> Drop for Leave<K, V> {
    fn drop(&mut self) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl<K, V> Flights<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless a flight for `key` is already under way, then returns its result.
    /// `lost` builds the value followers get if the task dies without an answer.
    pub async fn run<F>(&self, key: K, work: F, lost: impl FnOnce() -> V) -> (V, Role)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (mut rx, role) = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                Some(rx) => (rx.clone(), Role::Follower),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let leave = Leave {
                        inflight: self.inflight.clone(),
                        key,
                    };
                    // The flight's log lines carry the leader's request span.
                    let span = tracing::Span::current();
                    tokio::spawn(async move {
                        let value = tracing::Instrument::instrument(work, span).await;
                        // Leave the map before publishing: a caller arriving after this
                        // finds the stored result instead of a finished flight. (If `work`
                        // panics, the guard still leaves, and followers see the sender go.)
                        drop(leave);
                        let _ = tx.send(Some(value));
                    });
                    (rx, Role::Leader)
                }
            }
        };
        let value = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        (value.unwrap_or_else(lost), role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_execution_for_concurrent_callers() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::new(Flights::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (f, runs) = (flights.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                f.run(
                    "k",
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    },
                    || 0,
                )
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, role) = t.await.unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
    }
}
