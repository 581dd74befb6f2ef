//! Manifest flights: one fetch per key however many requests wait on it, run with the
//! parts of the proxy it needs (it outlives the request that started it), paid by the
//! caller that starts it, and sent to the key's owner first when there is a fleet.

use std::sync::Arc;

use super::flight::Role;
use super::manifests::ManifestAnswer;
use super::negative::NegativeCache;
use super::tiers::{ask_owner, Ask};
use super::{internal, Caller, Proxy};
use crate::fleet::{Fleet, Owner};
use crate::metrics::{Metrics, Outcome};
use crate::oci::{self, AcceptSet, ErrorCode, Reference, Repository};
use crate::store::shared::Shared;
use crate::store::TagRecord;
use crate::upstream::Upstream;

impl Proxy {
    /// Runs `work` once per key however many requests wait on it; followers are counted
    /// as coalesced. The flight is paid by the caller that starts it: a follower whose
    /// leader was refused for the leader's own client budget runs a flight of its own
    /// instead of inheriting a refusal that is not its.
    pub(super) async fn fly<F, W>(
        &self,
        key: String,
        caller: &Caller,
        work: W,
    ) -> Result<ManifestAnswer, oci::Error>
    where
        W: Fn(Parts) -> F,
        F: std::future::Future<Output = Result<ManifestAnswer, oci::Error>> + Send + 'static,
    {
        let flight = |parts: Parts| {
            let payer = parts.client.clone();
            let fut = work(parts);
            async move { (fut.await, payer) }
        };
        let lost = || {
            (
                Err(oci::Error::new(
                    ErrorCode::Internal,
                    "the manifest fetch ended unexpectedly",
                )),
                None,
            )
        };
        let ((mut result, paid_by), mut role) = self
            .manifest_flights
            .run(key.clone(), flight(self.clone_parts(caller)), lost)
            .await;
        let refused_for_budget = matches!(&result, Err(e) if e.code == ErrorCode::TooManyRequests);
        if role == Role::Follower && refused_for_budget && paid_by != caller.client {
            ((result, _), role) = self
                .manifest_flights
                .run(key, flight(self.clone_parts(caller)), lost)
                .await;
        }
        result.map(|mut a| {
            if role == Role::Follower && a.outcome == Outcome::Miss {
                a.outcome = Outcome::Coalesced;
            }
            a
        })
    }
}

/// The parts of the proxy a spawned flight needs (it outlives the request), and who pays.
#[derive(Clone)]
pub(super) struct Parts {
    pub(super) store: crate::store::Store,
    pub(super) clock: crate::clock::Clock,
    pub(super) shared: Option<Arc<Shared>>,
    /// The fleet, unless the request was forwarded (then it is answered here).
    pub(super) fleet: Option<Arc<Fleet>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) negative: Arc<NegativeCache>,
    pub(super) client: Option<String>,
}

impl Proxy {
    pub(super) fn clone_parts(&self, caller: &Caller) -> Parts {
        Parts {
            store: self.store.clone(),
            clock: self.clock.clone(),
            shared: self.shared.clone(),
            fleet: self.fleet.clone().filter(|_| !caller.forwarded),
            metrics: self.metrics.clone(),
            negative: self.negative.clone(),
            client: caller.client.clone(),
        }
    }
}

impl Parts {
    /// Asks the owners of `key` in rendezvous order until one answers; `None` when this
    /// replica's turn comes first (or there is no fleet): fetch it here.
    pub(super) async fn ask_owners(
        &self,
        key: &str,
        up: &Upstream,
        repo: &Repository,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Option<Result<ManifestAnswer, oci::Error>> {
        let fleet = self.fleet.as_ref()?;
        let ask = Ask {
            up,
            repo,
            reference,
            accept,
            client: self.client.as_deref(),
        };
        for owner in fleet.owners(key) {
            match owner {
                Owner::Me => return None,
                Owner::Peer(peer) => {
                    if let Some(answer) = ask_owner(fleet, &peer, &self.store, &ask).await {
                        return Some(answer);
                    }
                }
            }
        }
        None
    }

    pub(super) async fn put_local_tag(
        &self,
        key: String,
        record: TagRecord,
    ) -> Result<(), oci::Error> {
        self.store
            .put_tag(key, record)
            .await
            .map_err(|e| internal("writing the index", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use std::time::Duration;

    /// Regression: a coalesced follower inherited its leader's refusal when the leader's
    /// own client budget was spent. The clock is paused: the "sleeps" below only order
    /// the leader and the follower, they take no real time.
    #[tokio::test(start_paused = true)]
    async fn a_follower_is_not_refused_for_its_leaders_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let proxy = Arc::new(Proxy::new(
            store,
            Arc::new(Metrics::new()),
            None,
            None,
            true,
        ));
        let work = |parts: Parts| async move {
            // Long enough for the second caller to join this flight.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if parts.client.as_deref() == Some("spent") {
                return Err(oci::Error::new(ErrorCode::TooManyRequests, "budget spent"));
            }
            Ok(ManifestAnswer {
                digest: Digest::sha256_of(b"m"),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: bytes::Bytes::from_static(b"m"),
                outcome: Outcome::Miss,
                warning: None,
            })
        };
        let caller = |c: &str| Caller {
            client: Some(c.to_owned()),
            forwarded: false,
        };
        let leader = {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.fly("k".into(), &caller("spent"), work).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let follower = proxy.fly("k".into(), &caller("fresh"), work).await;
        assert_eq!(
            leader.await.unwrap().unwrap_err().code,
            ErrorCode::TooManyRequests
        );
        assert_eq!(follower.unwrap().outcome, Outcome::Miss);
    }
}
