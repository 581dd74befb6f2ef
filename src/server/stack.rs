//! The service every connection runs: the handler inside a `tower` stack. Each layer says
//! why it is there; only the panic layer turns a failure into an answer.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::ServiceBuilder;
use tower_http::catch_panic::{CatchPanic, CatchPanicLayer, ResponseForPanic};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestId, PropagateRequestIdLayer, RequestId, SetRequestId,
    SetRequestIdLayer,
};
use tower_http::trace::{MakeSpan, Trace, TraceLayer};

use super::response::{self, Body};
use crate::oci::{self, ErrorCode};

/// Metrics of the inbound side: handler panics, refused and timed-out connections.
#[derive(Clone, Default)]
pub struct ServerMetrics {
    pub panics: Counter,
    pub connections_refused: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

impl ServerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ServerMetrics::default();
        registry.register(
            "handler_panics",
            "Requests whose handler panicked (answered 500; the connection stays up)",
            m.panics.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept, by reason (max_connections, max_connections_per_client)",
            m.connections_refused.clone(),
        );
        m
    }
}

/// Request ids: the client's `x-request-id` when it sends a usable one, else a counter
/// that starts at a per-process random-ish point (ids from two replicas rarely collide).
#[derive(Clone)]
pub struct Ids(std::sync::Arc<AtomicU64>);

impl Ids {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Ids(std::sync::Arc::new(AtomicU64::new(seed)))
    }
}

impl MakeRequestId for Ids {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{n:016x}"))
            .ok()
            .map(RequestId::new)
    }
}

/// A handler panic: a 500 OCI error, a log line, a metric.
#[derive(Clone)]
pub struct Rescue(ServerMetrics);

impl ResponseForPanic for Rescue {
    type ResponseBody = Body;

    fn response_for_panic(&mut self, err: Box<dyn Any + Send + 'static>) -> Response<Body> {
        self.0.panics.inc();
        let what = err
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| err.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic".into());
        tracing::error!(panic = %what, "request handler panicked; answered 500");
        response::error(
            &oci::Error::new(ErrorCode::Internal, "internal error in berth (logged)"),
            false,
        )
    }
}

/// The id as it goes into logs: at most 64 visible characters of what the client sent.
fn loggable(id: Option<&HeaderValue>) -> String {
    id.and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// One span per request, named by its id.
#[derive(Clone, Copy)]
pub struct SpanPerRequest;

impl<B> MakeSpan<B> for SpanPerRequest {
    fn make_span(&mut self, req: &Request<B>) -> tracing::Span {
        tracing::info_span!("req", id = %loggable(req.headers().get("x-request-id")))
    }
}

/// The stack around a handler service `S`.
pub type Layered<S> = SetRequestId<
    PropagateRequestId<
        Trace<
            CatchPanic<S, Rescue>,
            SharedClassifier<ServerErrorsAsFailures>,
            SpanPerRequest,
            (),
            (),
            (),
            (),
            (),
        >,
    >,
    Ids,
>;

/// Wraps `inner` in the stack.
pub fn layered<S>(inner: S, metrics: ServerMetrics) -> Layered<S> {
    ServiceBuilder::new()
        // Every request carries an id (the client's, or a new one), echoed back.
        .layer(SetRequestIdLayer::x_request_id(Ids::new()))
        .layer(PropagateRequestIdLayer::x_request_id())
        // One span per request: every log line of the request, the fill it starts and its
        // upstream calls name the request id.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(SpanPerRequest)
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        // A handler panic becomes a 500 and a metric; the connection and the process live.
        .layer(CatchPanicLayer::custom(Rescue(metrics)))
        .service(inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    use super::*;

    /// A handler that panics on `/panic`, served through the real stack on a real socket:
    /// the panic is a 500 OCI error and a metric, and the same connection serves on.
    #[tokio::test]
    async fn a_handler_panic_is_a_500_and_the_connection_survives() {
        let metrics = ServerMetrics::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let server = {
            let metrics = metrics.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let handler =
                        tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
                            if req.uri().path() == "/panic" {
                                panic!("injected by the test");
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Body::bytes("fine")))
                        });
                    let svc = TowerToHyperService::new(layered(handler, metrics.clone()));
                    tokio::spawn(async move {
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        };
        let client = reqwest::Client::new();
        let resp = client
            .get(format!("http://{addr}/panic"))
            .header("x-request-id", "abc-123")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["x-request-id"], "abc-123");
        let body = resp.text().await.unwrap();
        assert!(body.contains("\"code\":\"UNKNOWN\""), "{body}");
        let resp = client
            .get(format!("http://{addr}/ok"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("x-request-id"));
        assert_eq!(resp.text().await.unwrap(), "fine");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection was dropped"
        );
        assert_eq!(metrics.panics.get(), 1);
        server.abort();
    }
}
