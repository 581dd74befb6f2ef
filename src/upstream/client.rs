//! One upstream registry: an HTTP client with its accounts (`account.rs`: credentials,
//! tokens and quota bucket, chosen per repository) and timeouts, and the few requests
//! berth makes (manifest GET/HEAD, blob GET/HEAD, pass-through GETs).
//!
//! Redirects (CDNs) are followed by reqwest, whose policy drops `Authorization` when the
//! next hop is another host, so credentials never leave the upstream that asked for them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use tracing::Instrument;

use super::account::{Account, Accounts, Link};
use super::egress::{self, Egress};
use super::error::{describe, Error};
use super::wire::{header_digest, header_str, parse_content_range, read_limited};
use crate::config::{ConfigError, CountedRequest, UpstreamConfig};
use crate::metrics::{Kind, Metrics, UpstreamLabels};
use crate::oci::media::MAX_MANIFEST_BYTES;
use crate::oci::{AcceptSet, Digest, Reference, Repository};
use crate::quota::{Ledger, Payer, Purpose, Quota};

/// What every upstream client shares: berth's own listeners (never a redirect target) and
/// the egress metrics.
#[derive(Clone, Default)]
pub struct Outbound {
    pub listeners: Vec<std::net::SocketAddr>,
    pub metrics: egress::EgressMetrics,
}

/// A manifest as fetched: the exact bytes and what the upstream said about them.
#[derive(Debug, Clone)]
pub struct ManifestResponse {
    pub bytes: Bytes,
    pub media_type: String,
    /// `Docker-Content-Digest`, when sent.
    pub digest: Option<Digest>,
}

/// What a manifest HEAD says.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
}

/// A blob body on its way: the response to stream, and where it starts.
pub struct BlobResponse {
    response: Response,
    /// The blob's full size when the upstream said it.
    pub total: Option<u64>,
}

impl BlobResponse {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        self.response
            .chunk()
            .await
            .map_err(|e| Error::Protocol(format!("body cut short: {}", describe(&e))))
    }
}

/// An answer relayed without caching (tags list, referrers).
#[derive(Debug, Clone)]
pub struct Passthrough {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Upstream {
    docker_hub: bool,
    /// The client, the address and the limits every account sends with.
    link: Link,
    /// Who berth is to this upstream, per repository.
    accounts: Accounts,
    pub tag_ttl: Duration,
    pub negative_ttl: Duration,
    pub stall_timeout: Duration,
    pub fill_deadline: Duration,
    /// Decides, with the account's bucket, whether a counted request may go (shared by
    /// all upstreams: per-client budgets span them).
    ledger: Arc<Ledger>,
    /// The last failure talking to this upstream, for the status page.
    last_error: std::sync::Mutex<Option<(String, u64)>>,
}

/// The longest pass-through body berth relays (tags lists of huge repositories).
const MAX_PASSTHROUGH_BYTES: usize = 16 * 1024 * 1024;

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        ledger: Arc<Ledger>,
        outbound: &Outbound,
    ) -> Result<Self, ConfigError> {
        let at = format!("upstreams ({})", config.host);
        let base = Url::parse(config.url.trim_end_matches('/'))
            .map_err(|e| ConfigError(format!("{at}.url: {e}")))?;
        let egress = Egress::new(
            &config.host,
            &base,
            &config.redirect_allow,
            outbound.listeners.clone(),
            outbound.metrics.clone(),
        )?;
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            // No proxy from the environment: a proxy resolves redirect targets itself, out
            // of the egress policy's sight.
            .no_proxy()
            // Every hop and every name resolved goes through the egress policy.
            .redirect(egress::redirect_policy(egress.clone()))
            .dns_resolver(Arc::new(egress::Resolver(egress.clone())));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                ConfigError(format!("{at}.ca_file: cannot read {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConfigError(format!("{at}.ca_file: {e}")))?;
            if certs.is_empty() {
                return Err(ConfigError(format!(
                    "{at}.ca_file: {} holds no PEM certificate",
                    ca.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError(format!("{at}: cannot build the HTTP client: {e}")))?;
        let docker_hub = std::iter::once(&config.host)
            .chain(&config.aliases)
            .any(|h| h == "docker.io" || h.ends_with(".docker.io"));
        let accounts = Accounts::new(config, docker_hub, &metrics)?;
        Ok(Upstream {
            docker_hub,
            link: Link {
                host: config.host.clone(),
                base,
                http,
                egress,
                response_timeout: config.response_timeout,
                stall_timeout: config.stall_timeout,
                body_timeout: config.body_timeout,
                metrics,
            },
            accounts,
            ledger,
            last_error: std::sync::Mutex::new(None),
            tag_ttl: config.tag_ttl,
            negative_ttl: config.negative_ttl,
            stall_timeout: config.stall_timeout,
            fill_deadline: config.fill_deadline,
        })
    }

    /// The configured host name, as used in metrics, logs and index keys.
    pub fn host(&self) -> &str {
        &self.link.host
    }

    pub fn is_docker_hub(&self) -> bool {
        self.docker_hub
    }

    /// The bucket of the upstream's own account (its top-level credentials, or anonymous
    /// access): what the `berth_quota_*{upstream}` series describe.
    pub fn quota(&self) -> &Quota {
        self.accounts.default_account().quota()
    }

    /// Every account's bucket, the upstream's own first, then each
    /// `[[upstreams.credentials]]` entry's with its name.
    pub fn quotas(&self) -> impl Iterator<Item = (Option<&str>, &Quota)> {
        self.accounts.all().map(|a| (a.name(), a.quota()))
    }

    /// The name of the account requests for `repo` go out with: the entry's `name` (or
    /// first pattern); for the upstream's own account `"default"` when it has credentials,
    /// `None` when it is anonymous.
    pub fn credential_name(&self, repo: &Repository) -> Option<&str> {
        let account = self.accounts.for_repo(repo);
        match account.name() {
            Some(name) => Some(name),
            None => account.has_credentials().then_some("default"),
        }
    }

    /// The configured URL (no credentials are ever part of it).
    pub fn url_str(&self) -> &str {
        self.link.base.as_str()
    }

    fn remember(&self, message: String) {
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((message, crate::clock::now_secs()));
    }

    /// The last failure and when (unix seconds).
    pub fn last_error(&self) -> Option<(String, u64)> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn url(&self, path: &str, query: Option<&str>) -> Url {
        let mut url = self.link.base.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}/v2/{path}"));
        url.set_query(query);
        url
    }

    fn labels(&self) -> UpstreamLabels {
        UpstreamLabels {
            upstream: self.link.host.clone(),
        }
    }

    /// Sends one request for `repo` with the account its repository uses, charging that
    /// account's bucket when the request is `counted`.
    async fn send(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        repo: &Repository,
        kind: Kind,
        counted: Option<(CountedRequest, &Payer)>,
    ) -> Result<Response, Error> {
        let account: &Account = self.accounts.for_repo(repo);
        let charge = match counted {
            Some((request, payer)) => self
                .ledger
                .charge(account.quota(), &self.link.host, request, payer)
                .map_err(Error::Quota)?,
            None => None,
        };
        // Log lines of the call name the upstream and the account (never its username),
        // inside the request's span.
        let span =
            tracing::info_span!("upstream", host = %self.link.host, credential = account.label());
        let result = account
            .send(&self.link, method, url, headers, repo, kind)
            .instrument(span)
            .await;
        match &result {
            Err(e) => self.remember(e.to_string()),
            Ok(r) if r.status().is_server_error() => {
                self.remember(format!("status {}", r.status().as_u16()))
            }
            Ok(_) => {}
        }
        if let Some(charge) = charge {
            charge.settle(!matches!(&result, Err(e) if !e.reached_upstream()));
        }
        result
    }

    fn accept_headers(accept: AcceptSet) -> HeaderMap {
        let mut h = HeaderMap::new();
        for mt in accept.media_types() {
            h.append(header::ACCEPT, HeaderValue::from_static(mt));
        }
        h
    }

    /// GET a manifest; `None` when the upstream does not have it. `payer` says who pays
    /// and for what, if the upstream counts it (Docker Hub does).
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: AcceptSet,
        payer: &Payer,
    ) -> Result<Option<ManifestResponse>, Error> {
        let url = self.url(&format!("{repo}/manifests/{reference}"), None);
        let counted = Some((CountedRequest::ManifestGet, payer));
        let resp = self
            .send(
                Method::GET,
                url,
                Self::accept_headers(accept),
                repo,
                Kind::Manifest,
                counted,
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => return Ok(None),
            s if s.is_success() => {}
            s => return Err(Error::Status { status: s.as_u16() }),
        }
        if let Some(len) = resp.content_length() {
            if len > MAX_MANIFEST_BYTES as u64 {
                return Err(Error::TooLarge(format!(
                    "manifest is {len} bytes, over the {MAX_MANIFEST_BYTES}-byte limit"
                )));
            }
        }
        let digest = header_digest(resp.headers())?;
        let media_type = header_str(resp.headers(), header::CONTENT_TYPE);
        let bytes = read_limited(
            resp,
            MAX_MANIFEST_BYTES,
            self.stall_timeout,
            self.link.body_timeout,
        )
        .await?;
        let media_type = match media_type {
            Some(mt) if mt != "application/json" && mt != "text/plain" => mt,
            // Some registries send a generic type; the manifest itself says what it is.
            _ => crate::oci::manifest::sniff_media_type(&bytes)
                .ok_or_else(|| Error::Protocol("manifest has no usable media type".into()))?,
        };
        Ok(Some(ManifestResponse {
            bytes,
            media_type,
            digest,
        }))
    }

    /// HEAD a manifest (free on Docker Hub); `None` when the upstream does not have it.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<Option<ManifestHead>, Error> {
        let url = self.url(&format!("{repo}/manifests/{reference}"), None);
        // HEADs are berth's own checks (revalidation, authorisation): no client pays.
        let payer = Payer::berth(Purpose::Refresh);
        let counted = Some((CountedRequest::ManifestHead, &payer));
        let resp = self
            .send(
                Method::HEAD,
                url,
                Self::accept_headers(accept),
                repo,
                Kind::Manifest,
                counted,
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(ManifestHead {
                digest: header_digest(resp.headers())?,
                media_type: header_str(resp.headers(), header::CONTENT_TYPE),
            })),
            s => Err(Error::Status { status: s.as_u16() }),
        }
    }

    /// HEAD a blob in a repository: whether that repository has it, and its size.
    pub async fn head_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, Error> {
        let url = self.url(&format!("{repo}/blobs/{digest}"), None);
        let payer = Payer::berth(Purpose::New);
        let counted = Some((CountedRequest::BlobHead, &payer));
        let resp = self
            .send(
                Method::HEAD,
                url,
                HeaderMap::new(),
                repo,
                Kind::Blob,
                counted,
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            // reqwest's content_length() is the body's size, which is zero for a HEAD.
            s if s.is_success() => header_str(resp.headers(), header::CONTENT_LENGTH)
                .and_then(|v| crate::oci::digits(v.trim()))
                .map(Some)
                .ok_or_else(|| Error::Protocol("blob HEAD without Content-Length".into())),
            s => Err(Error::Status { status: s.as_u16() }),
        }
    }

    /// GET a blob from byte `offset` on; `None` when the upstream does not have it.
    /// With `offset > 0` the upstream must answer 206 from exactly that byte.
    pub async fn get_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        payer: &Payer,
    ) -> Result<Option<BlobResponse>, Error> {
        let url = self.url(&format!("{repo}/blobs/{digest}"), None);
        let mut headers = HeaderMap::new();
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                .map_err(|_| Error::Protocol("bad range".into()))?;
            headers.insert(header::RANGE, range);
        }
        let resp = self
            .send(
                Method::GET,
                url,
                headers,
                repo,
                Kind::Blob,
                Some((CountedRequest::BlobGet, payer)),
            )
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK if offset == 0 => {
                let total = resp.content_length();
                Ok(Some(BlobResponse {
                    response: resp,
                    total,
                }))
            }
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let (start, total) = header_str(resp.headers(), header::CONTENT_RANGE)
                    .and_then(|v| parse_content_range(&v))
                    .ok_or_else(|| Error::Protocol("206 without a usable Content-Range".into()))?;
                if start != offset {
                    return Err(Error::Protocol(format!(
                        "asked to resume at byte {offset}, got {start}"
                    )));
                }
                Ok(Some(BlobResponse {
                    response: resp,
                    total,
                }))
            }
            StatusCode::OK => Err(Error::Protocol(
                "upstream does not support range requests".into(),
            )),
            s => Err(Error::Status { status: s.as_u16() }),
        }
    }

    /// Relays a GET (tags list, referrers) without caching. `path` is below `/v2/`.
    pub async fn passthrough(
        &self,
        repo: &Repository,
        path: &str,
        query: Option<&str>,
        kind: Kind,
    ) -> Result<Passthrough, Error> {
        let url = self.url(path, query);
        let resp = self
            .send(Method::GET, url, HeaderMap::new(), repo, kind, None)
            .await?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(Error::Status {
                status: status.as_u16(),
            });
        }
        let mut headers = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::LINK] {
            if let Some(v) = resp.headers().get(&name) {
                headers.insert(name, v.clone());
            }
        }
        if let Some(v) = resp.headers().get("oci-filters-applied") {
            headers.insert("oci-filters-applied", v.clone());
        }
        let body = read_limited(
            resp,
            MAX_PASSTHROUGH_BYTES,
            self.stall_timeout,
            self.link.body_timeout,
        )
        .await?;
        Ok(Passthrough {
            status,
            headers,
            body,
        })
    }

    /// Counts bytes received from this upstream.
    pub fn count_fetched(&self, n: u64) {
        self.link
            .metrics
            .upstream_bytes
            .get_or_create(&self.labels())
            .inc_by(n);
    }
}
