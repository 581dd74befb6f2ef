//! Tags lists and referrers lists: small answers relayed from the upstream and kept, so
//! that an admission controller checking signatures and referrers still gets its answer
//! while the upstream is down.
//!
//! Policy, as for tags (`freshness.rs`): a kept answer validated within the upstream's
//! `tag_ttl` is served without asking; a stale or missing one is fetched again (a GET:
//! these are not counted on Docker Hub), one fetch per key however many requests wait;
//! when the upstream cannot answer (outage, timeout, 5xx, 429) the kept answer is served
//! with a `Warning`. Only 200 answers are kept; anything else is relayed as before, and
//! a 404 forgets what was kept (the upstream outranks a stale copy). What is kept and how
//! much is `store/documents.rs`'s business.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::flight::Role;
use super::freshness::{self, Before};
use super::{internal, Proxy};
use crate::clock::Clock;
use crate::metrics::{Kind, Metrics, Outcome};
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::store::{Document, Store};
use crate::upstream::{Passthrough, Upstream};

/// Which list, with the query that selects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// `GET /v2/<name>/tags/list?n=&last=`
    Tags {
        n: Option<u32>,
        last: Option<String>,
    },
    /// `GET /v2/<name>/referrers/<digest>?artifactType=`
    Referrers {
        digest: Digest,
        artifact_type: Option<String>,
    },
}

impl Listing {
    /// The upstream path, below `/v2/`.
    fn path(&self, repo: &Repository) -> String {
        match self {
            Listing::Tags { .. } => format!("{repo}/tags/list"),
            Listing::Referrers { digest, .. } => format!("{repo}/referrers/{digest}"),
        }
    }

    /// The query sent upstream, in one spelling whatever the client's.
    fn query(&self) -> Option<String> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        match self {
            Listing::Tags { n, last } => {
                if let Some(n) = n {
                    q.append_pair("n", &n.to_string());
                }
                if let Some(last) = last {
                    q.append_pair("last", last);
                }
            }
            Listing::Referrers { artifact_type, .. } => {
                if let Some(t) = artifact_type {
                    q.append_pair("artifactType", t);
                }
            }
        }
        Some(q.finish()).filter(|q| !q.is_empty())
    }

    fn kind(&self) -> Kind {
        match self {
            Listing::Tags { .. } => Kind::Tags,
            Listing::Referrers { .. } => Kind::Referrers,
        }
    }

    fn noun(&self) -> &'static str {
        match self {
            Listing::Tags { .. } => "tags list",
            Listing::Referrers { .. } => "referrers list",
        }
    }

    /// The key the answer is kept (and its fetch coalesced) under.
    pub fn key(&self, host: &str, repo: &Repository) -> String {
        format!(
            "{host}/{}?{}",
            self.path(repo),
            self.query().unwrap_or_default()
        )
    }
}

/// A list to send: the upstream's status, relayed headers and body.
#[derive(Clone, Debug)]
pub struct ListingAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub outcome: Outcome,
    /// Set on stale answers: why the upstream could not be asked.
    pub warning: Option<String>,
}

impl ListingAnswer {
    fn kept(doc: Document, outcome: Outcome, warning: Option<String>) -> Self {
        let mut headers = HeaderMap::new();
        for (name, value) in &doc.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        ListingAnswer {
            status: StatusCode::from_u16(doc.status).unwrap_or(StatusCode::OK),
            headers,
            body: doc.body,
            outcome,
            warning,
        }
    }

    fn relayed(p: Passthrough, outcome: Outcome) -> Self {
        ListingAnswer {
            status: p.status,
            headers: p.headers,
            body: p.body,
            outcome,
            warning: None,
        }
    }
}

impl Proxy {
    /// A tags list or referrers list: kept, fetched, or kept and stale.
    pub async fn listing(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        listing: Listing,
    ) -> Result<ListingAnswer, oci::Error> {
        let key = listing.key(up.host(), repo);
        if let Some(doc) = fresh(&self.store, up, &key, self.clock.now_millis()).await? {
            return Ok(ListingAnswer::kept(doc, Outcome::Hit, None));
        }
        let fetch = Fetch {
            clock: self.clock.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            places: self.passthroughs.clone(),
            up: up.clone(),
            repo: repo.clone(),
            listing,
            key: key.clone(),
        };
        let lost = || {
            Err(oci::Error::new(
                ErrorCode::Internal,
                "the list's fetch ended unexpectedly",
            ))
        };
        let (result, role) = self
            .listing_flights
            .run(key, Box::pin(fetch.run()), lost)
            .await;
        result.map(|mut a| {
            if role == Role::Follower && a.outcome == Outcome::Miss {
                a.outcome = Outcome::Coalesced;
            }
            a
        })
    }

    /// Pins the kept answer of `listing` against the documents' bounds (the warm list).
    pub(super) async fn pin_listing(
        &self,
        up: &Upstream,
        repo: &Repository,
        listing: &Listing,
    ) -> Result<(), oci::Error> {
        self.store
            .pin_document(listing.key(up.host(), repo))
            .await
            .map(drop)
            .map_err(|e| internal("writing the index", e))
    }
}

async fn kept(store: &Store, key: &str) -> Result<Option<Document>, oci::Error> {
    store
        .document(key)
        .await
        .map_err(|e| internal("reading the index", e))
}

/// The kept answer for `key` if it was validated within the upstream's `tag_ttl`.
async fn fresh(
    store: &Store,
    up: &Upstream,
    key: &str,
    now_ms: u64,
) -> Result<Option<Document>, oci::Error> {
    Ok(kept(store, key).await?.filter(|d| is_fresh(d, up, now_ms)))
}

fn is_fresh(doc: &Document, up: &Upstream, now_ms: u64) -> bool {
    freshness::before_asking(Some(doc.validated_ms), now_ms, up.tag_ttl) == Before::Fresh
}

/// One fetch of a list, with what it needs (it outlives the request that started it).
struct Fetch {
    store: Store,
    clock: Clock,
    metrics: Arc<Metrics>,
    places: Arc<tokio::sync::Semaphore>,
    up: Arc<Upstream>,
    repo: Repository,
    listing: Listing,
    key: String,
}

impl Fetch {
    async fn run(self) -> Result<ListingAnswer, oci::Error> {
        // Another flight may have refreshed it since the request looked.
        let held = kept(&self.store, &self.key).await?;
        let now = self.clock.now_millis();
        if let Some(doc) = held.clone().filter(|d| is_fresh(d, &self.up, now)) {
            return Ok(ListingAnswer::kept(doc, Outcome::Hit, None));
        }
        // Fetches hold an upstream connection and up to 16 MiB each; a flood of distinct
        // lists must not crowd out pulls. Refused rather than queued: retried cheaply.
        let Ok(_place) = self.places.try_acquire() else {
            let why = "too many tags-list and referrers fetches in flight to upstreams \
                       (server.max_concurrent_passthroughs)";
            return match held {
                Some(doc) => Ok(self.stale(doc, why)),
                None => Err(oci::Error::new(
                    ErrorCode::Unavailable,
                    format!("{why}; retry shortly"),
                )
                .retry_after(std::time::Duration::from_secs(1))),
            };
        };
        let path = self.listing.path(&self.repo);
        let query = self.listing.query();
        let fetched = self
            .up
            .passthrough(&self.repo, &path, query.as_deref(), self.listing.kind())
            .await;
        match fetched {
            Ok(p) if p.status == StatusCode::OK => {
                let doc = Document {
                    status: p.status.as_u16(),
                    headers: p
                        .headers
                        .iter()
                        .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_owned())))
                        .collect(),
                    body: p.body.clone(),
                    validated_ms: self.clock.now_millis(),
                };
                self.store
                    .put_document(self.key.clone(), doc)
                    .await
                    .map_err(|e| internal("writing the index", e))?;
                let outcome = match held {
                    Some(_) => Outcome::Revalidated,
                    None => Outcome::Miss,
                };
                Ok(ListingAnswer::relayed(p, outcome))
            }
            Ok(p) => {
                if held.is_some() && p.status == StatusCode::NOT_FOUND {
                    self.store
                        .remove_document(self.key.clone())
                        .await
                        .map_err(|e| internal("writing the index", e))?;
                }
                Ok(ListingAnswer::relayed(p, Outcome::Passthrough))
            }
            Err(e) => match held {
                Some(doc) if e.allows_stale() => {
                    super::count_quota_stale(&self.metrics, self.up.host(), &e);
                    tracing::warn!(upstream = self.up.host(), error = %e,
                        "serving a stale {}", self.listing.noun());
                    Ok(self.stale(doc, &format!("could not answer ({e})")))
                }
                _ => Err(e.to_oci(self.up.host())),
            },
        }
    }

    fn stale(&self, doc: Document, why: &str) -> ListingAnswer {
        let age = self.clock.now_millis().saturating_sub(doc.validated_ms) / 1000;
        let warning = format!(
            "upstream {}: {why}; serving the {} last validated {age}s ago",
            self.up.host(),
            self.listing.noun()
        );
        ListingAnswer::kept(doc, Outcome::Stale, Some(warning))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_upstream_repository_and_query() {
        let up = "docker.io";
        let repo = Repository::parse("library/app").unwrap();
        let tags = |n, last: Option<&str>| Listing::Tags {
            n,
            last: last.map(str::to_owned),
        };
        assert_eq!(
            tags(None, None).key(up, &repo),
            "docker.io/library/app/tags/list?"
        );
        assert_eq!(
            tags(Some(2), Some("a b&c")).key(up, &repo),
            "docker.io/library/app/tags/list?n=2&last=a+b%26c"
        );
        let digest = Digest::sha256_of(b"x");
        let refs = |t: Option<&str>| Listing::Referrers {
            digest: digest.clone(),
            artifact_type: t.map(str::to_owned),
        };
        assert_eq!(
            refs(None).key(up, &repo),
            format!("docker.io/library/app/referrers/{digest}?")
        );
        assert_eq!(
            refs(Some("application/vnd.dev.sigstore.bundle+json")).key(up, &repo),
            format!(
                "docker.io/library/app/referrers/{digest}?artifactType=application%2Fvnd.dev.sigstore.bundle%2Bjson"
            )
        );
    }
}
