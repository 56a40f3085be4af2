//! The Prometheus endpoint of the long-lived servers (`snapshotter`,
//! `store`): `GET /metrics` answers the process's counters in the text
//! exposition format; anything else is 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Bind `addr` and serve in the background; `refresh` runs before each
/// scrape (to measure what is not counted as it happens, e.g. the store's
/// size). Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    refresh: impl Fn() + Send + Sync + 'static,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    let refresh = Arc::new(refresh);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let refresh = refresh.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let refresh = refresh.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &*refresh)) }
                });
                // A client that opens a connection and sends nothing is cut
                // off by hyper's header timeout, not kept for ever.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn answer(req: &Request<Incoming>, refresh: &(dyn Fn() + Send + Sync)) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", String::new());
    }
    refresh();
    reply(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        lazylayer_metrics::encode_text(),
    )
}
