//! Where a fill's bytes come from: the upstream, the shared tier, or the replica that owns
//! the digest. Whatever the origin, the fill hashes what arrives and aborts its clients'
//! streams if it does not match: a peer or an object store is trusted no more than an
//! upstream.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use crate::fleet::client::{Answer, Ask};
use crate::fleet::{Fleet, Owner};
use crate::oci::{self, Digest, Repository};
use crate::quota::{Payer, Purpose};
use crate::store::shared::Shared;
use crate::upstream::{self, BlobResponse, Upstream};

/// Where a fill was told to look, decided when it starts, and who pays if the upstream
/// counts the blob GET (the client that started the fill).
#[derive(Clone)]
pub struct Origin {
    pub via: Via,
    pub client: Option<String>,
}

#[derive(Clone)]
pub enum Via {
    Upstream,
    /// The shared tier holds the blob (and the repository was authorised).
    Shared(Arc<Shared>),
    /// Ask the owners in rendezvous order; `Owner::Me` means the upstream.
    Fleet {
        fleet: Arc<Fleet>,
        owners: Vec<Owner>,
    },
}

/// Which source actually answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answered {
    Upstream,
    Shared,
    Peer(String),
}

pub enum Body {
    Upstream(BlobResponse),
    Stream(BoxStream<'static, Result<Bytes, String>>),
}

impl Body {
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            Body::Upstream(r) => r.chunk().await.map_err(|e| e.to_string()),
            Body::Stream(s) => s.next().await.transpose(),
        }
    }
}

/// A response on its way, from byte `from` of the blob.
pub struct Opened {
    pub total: Option<u64>,
    pub body: Body,
    pub answered: Answered,
}

pub enum OpenError {
    /// The repository does not hold the blob.
    Unknown,
    /// Talking to the upstream failed (some failures may be resumed).
    Upstream(upstream::Error),
    /// Anything else, already in OCI terms.
    Oci(oci::Error),
}

pub struct Request<'a> {
    pub up: &'a Upstream,
    pub repo: &'a Repository,
    pub digest: &'a Digest,
    pub from: u64,
}

impl Origin {
    /// Opens the blob at `r.from`. A fleet origin tries the owners in order, skipping
    /// those that do not answer, and fetches from the upstream itself when its turn comes.
    pub async fn open(&self, r: &Request<'_>) -> Result<Opened, OpenError> {
        let payer = Payer::new(Purpose::New, self.client.clone());
        let client = self.client.as_deref();
        match &self.via {
            Via::Upstream => open_upstream(r, &payer).await,
            Via::Shared(shared) => match shared.blob_stream(r.digest, r.from).await {
                Ok(Some((size, stream))) => Ok(Opened {
                    total: Some(size),
                    body: Body::Stream(stream),
                    answered: Answered::Shared,
                }),
                // Gone or unreachable since the look: the upstream has it.
                Ok(None) | Err(_) => open_upstream(r, &payer).await,
            },
            Via::Fleet { fleet, owners } => {
                for owner in owners {
                    let peer = match owner {
                        Owner::Me => return open_upstream(r, &payer).await,
                        Owner::Peer(p) => p,
                    };
                    match open_peer(fleet, peer, client, r).await {
                        Some(result) => return result,
                        None => continue,
                    }
                }
                open_upstream(r, &payer).await
            }
        }
    }
}

async fn open_upstream(r: &Request<'_>, payer: &Payer) -> Result<Opened, OpenError> {
    match r.up.get_blob(r.repo, r.digest, r.from, payer).await {
        Ok(Some(resp)) => Ok(Opened {
            total: resp.total,
            body: Body::Upstream(resp),
            answered: Answered::Upstream,
        }),
        Ok(None) => Err(OpenError::Unknown),
        Err(e) => Err(OpenError::Upstream(e)),
    }
}

/// `None` when the peer did not answer (it is marked down; try the next one).
async fn open_peer(
    fleet: &Fleet,
    peer: &str,
    client: Option<&str>,
    r: &Request<'_>,
) -> Option<Result<Opened, OpenError>> {
    let ask = Ask {
        upstream: r.up.host(),
        repo: r.repo,
        client,
    };
    match fleet.blob(peer, &ask, r.digest, r.from).await {
        Answer::Down => None,
        Answer::Unknown => Some(Err(OpenError::Unknown)),
        Answer::Failed(e) => Some(Err(OpenError::Oci(e))),
        Answer::Got(b) => Some(Ok(Opened {
            total: b.total,
            body: Body::Stream(b.body),
            answered: Answered::Peer(peer.to_owned()),
        })),
    }
}
