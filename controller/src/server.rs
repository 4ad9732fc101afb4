//! Serving [`crate::app`] on a socket: plain HTTP, or HTTPS with rustls when a certificate and
//! key are given. Both carry connect info (the source address handlers record as a node's
//! reflexive endpoint) and shut down gracefully: on `shutdown`, open netmap streams are ended
//! (agents reconnect) and in-flight requests finish.
//!
//! TLS uses rustls with the `ring` provider (no C toolchain or cmake needed), TLS 1.2 and 1.3,
//! HTTP/1.1 and h2 via ALPN. Plain HTTP is only what `serve` does when no certificate is given;
//! agents refuse it unless explicitly allowed.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{app, AppState};

/// How long in-flight requests get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found")]
    NoKey { path: PathBuf },
    #[error("{path}: malformed PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate and key do not form a usable TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads a PEM certificate chain and private key into a rustls server configuration.
pub fn tls_config(cert: &Path, key: &Path) -> Result<RustlsConfig, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let cert_pem = read(cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_owned(),
        },
        other => TlsError::Pem {
            path: key.to_owned(),
            message: other.to_string(),
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, private)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(config)))
}

/// Serves `state` on `listener` until `shutdown` resolves; HTTPS when `tls` is given.
///
/// Limits (`limits:` in the config): at most `max_connections` open connections, and
/// `max_connections_per_source` from one address (more are closed at once, before any TLS
/// work); request headers (and, on a kept-alive connection, the next request) must arrive
/// within `header_timeout_secs`, the TLS handshake too; bodies within `body_timeout_secs`
/// (see the JSON extractor).
pub async fn serve(
    listener: std::net::TcpListener,
    state: AppState,
    tls: Option<RustlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let streams = state.clone();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        streams.close_streams();
        h.graceful_shutdown(Some(DRAIN));
    });
    let limits = state.limits;
    let header_timeout = Duration::from_secs(limits.header_timeout_secs);
    let gate = ConnectionGate::new(
        limits.max_connections,
        limits.max_connections_per_source,
        header_timeout,
    );
    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();
    let mut server = axum_server::from_tcp(listener).handle(handle);
    server
        .http_builder()
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    server
        .http_builder()
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(header_timeout))
        .keep_alive_timeout(header_timeout);
    match tls {
        Some(tls) => {
            let acceptor = RustlsAcceptor::new(tls)
                .handshake_timeout(header_timeout)
                .acceptor(gate);
            server.acceptor(acceptor).serve(service).await
        }
        None => server.acceptor(gate).serve(service).await,
    }
}

/// Counts open connections, in total and per source address.
#[derive(Debug, Clone)]
pub struct ConnectionGate {
    max: usize,
    per_source: usize,
    /// How long a new connection may stay silent.
    first_bytes: Duration,
    open: Arc<Mutex<GateCounts>>,
}

#[derive(Debug, Default)]
struct GateCounts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl ConnectionGate {
    pub fn new(max: usize, per_source: usize, first_bytes: Duration) -> Self {
        Self {
            max,
            per_source,
            first_bytes,
            open: Arc::default(),
        }
    }

    /// A pass for one more connection from `source`, or `None` when a limit is reached.
    pub fn admit(&self, source: IpAddr) -> Option<GatePass> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let from_source = open.by_source.get(&source).copied().unwrap_or(0);
        if open.total >= self.max || from_source >= self.per_source {
            return None;
        }
        open.total += 1;
        open.by_source.insert(source, from_source + 1);
        Some(GatePass {
            open: Arc::clone(&self.open),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One admitted connection; dropping it (the connection closed) frees its place.
#[derive(Debug)]
pub struct GatePass {
    open: Arc<Mutex<GateCounts>>,
    source: IpAddr,
}

impl Drop for GatePass {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

type AcceptFuture<S> =
    Pin<Box<dyn Future<Output = std::io::Result<(GatedStream, S)>> + Send + 'static>>;

impl<S: Send + 'static> Accept<TcpStream, S> for ConnectionGate {
    type Stream = GatedStream;
    type Service = S;
    type Future = AcceptFuture<S>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let pass = stream
            .peer_addr()
            .ok()
            .and_then(|a| self.admit(crate::limit::source_key(a.ip())));
        let first_bytes = self.first_bytes;
        Box::pin(async move {
            // Dropping the stream closes it: no TLS, no HTTP work for it.
            let pass = pass.ok_or_else(|| std::io::Error::other("connection limit reached"))?;
            // The client speaks first (request line or TLS ClientHello). Until hyper has
            // bytes to parse, its header timeout is not running: this one covers that.
            let mut first = [0u8; 1];
            tokio::time::timeout(first_bytes, stream.peek(&mut first))
                .await
                .map_err(|_| std::io::Error::other("no request within the header timeout"))??;
            Ok((
                GatedStream {
                    inner: stream,
                    _pass: pass,
                },
                service,
            ))
        })
    }
}

/// A TCP stream holding its place in the [`ConnectionGate`].
#[derive(Debug)]
pub struct GatedStream {
    inner: TcpStream,
    _pass: GatePass,
}

impl AsyncRead for GatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_connections_in_total_and_per_source_and_frees_them_on_drop() {
        let gate = ConnectionGate::new(3, 2, Duration::from_secs(1));
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let a1 = gate.admit(a).expect("a1");
        let _a2 = gate.admit(a).expect("a2");
        assert!(gate.admit(a).is_none(), "per source");
        let _b1 = gate.admit(b).expect("b1");
        assert!(gate.admit(b).is_none(), "total");
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(b).is_some());
    }
}
