//! HTTP(S) client for the controller's node API (blocking, `ureq` with rustls/ring: the agent
//! has no async runtime and needs none for one long-lived stream and a few POSTs).
//!
//! TLS: `https://` URLs verify the controller against the given PEM file: a certificate equal to
//! the server's is pinned as is (self-signed controllers), otherwise the file's certificates are
//! CAs for the usual chain and name check. Without a file: the webpki roots. `http://` is refused unless explicitly allowed.
//!
//! The stream is read as Server-Sent Events: one [`StreamEvent`] per `data:` line, keep-alive
//! comments in between. A read timeout of [`STREAM_IDLE`] (three controller keep-alive
//! intervals) declares a silent connection dead, so a half-open TCP connection (uplink died
//! under us) is noticed and the caller reconnects.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::de::DeserializeOwned;
use skymesh_proto::{
    EndpointsReport, RegisterRequest, RegisterResponse, RotateKeyRequest, SignedNetMap,
    StatusReport, StreamEvent,
};

/// Longest silence on the stream before it is declared dead (controller keep-alive is 15 s).
pub(crate) const STREAM_IDLE: Duration = Duration::from_secs(45);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How to reach the controller.
#[derive(Debug, Clone)]
pub(crate) struct ControllerOptions {
    pub(crate) url: String,
    /// PEM file with the CA or the controller's own certificate to trust (pinning).
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Allow plain `http://` (tests, lab setups).
    pub(crate) allow_http: bool,
}

#[derive(Clone)]
pub(crate) struct Client {
    base: String,
    agent: ureq::Agent,
    stream_agent: ureq::Agent,
}

/// Trusts a server whose end-entity certificate is exactly one of the pinned certificates
/// (a self-signed controller certificate), and otherwise verifies the chain against the same
/// certificates as CAs (with the usual name check).
#[derive(Debug)]
struct PinnedOrCa {
    pinned: Vec<rustls::pki_types::CertificateDer<'static>>,
    ca: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedOrCa {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        self.ca
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: malformed PEM", ca.display()))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate found", ca.display());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .with_context(|| format!("{}: unusable certificate", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedOrCa {
        ca: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .with_context(|| format!("{}: no usable trust anchor", ca.display()))?,
        pinned: certs,
        provider: provider.clone(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Client {
    pub(crate) fn new(opts: &ControllerOptions) -> anyhow::Result<Self> {
        let base = opts.url.trim_end_matches('/').to_string();
        if base.starts_with("http://") {
            if !opts.allow_http {
                bail!(
                    "{base}: plain HTTP would expose the node credential; use https:// or pass \
                     --allow-http for a lab setup"
                );
            }
            tracing::warn!(url = %base, "talking to the controller over plain HTTP");
        } else if !base.starts_with("https://") {
            bail!("{base}: the controller URL must start with https:// (or http://)");
        }
        let builder = |read: Duration| {
            let mut b = ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .timeout_read(read)
                .timeout_write(REQUEST_TIMEOUT);
            if let Some(ca) = &opts.ca {
                b = b.tls_config(tls_config(ca)?);
            }
            anyhow::Ok(b.build())
        };
        Ok(Client {
            base,
            agent: builder(REQUEST_TIMEOUT)?,
            stream_agent: builder(STREAM_IDLE)?,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn decode<T: DeserializeOwned>(
        what: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> anyhow::Result<T> {
        match r {
            Ok(resp) => {
                let body = read_capped(resp.into_reader(), MAX_RESPONSE_BYTES)
                    .with_context(|| format!("{what}: reading the response"))?;
                serde_json::from_slice(&body).with_context(|| format!("{what}: malformed response"))
            }
            Err(e) => Err(api_error(what, e)),
        }
    }

    fn no_content(what: &str, r: Result<ureq::Response, ureq::Error>) -> anyhow::Result<()> {
        r.map(drop).map_err(|e| api_error(what, e))
    }

    pub(crate) fn register(&self, req: &RegisterRequest) -> anyhow::Result<RegisterResponse> {
        let r = self
            .agent
            .post(&self.url("/api/v1/register"))
            .send_json(req);
        Self::decode("registering", r)
    }

    pub(crate) fn netmap(&self, credential: &str) -> anyhow::Result<SignedNetMap> {
        let r = self
            .agent
            .get(&self.url("/api/v1/netmap"))
            .set("Authorization", &format!("Bearer {credential}"))
            .call();
        Self::decode("fetching the netmap", r)
    }

    pub(crate) fn report_endpoints(
        &self,
        credential: &str,
        report: &EndpointsReport,
    ) -> anyhow::Result<()> {
        let r = self
            .agent
            .post(&self.url("/api/v1/node/endpoints"))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(report);
        Self::no_content("reporting endpoints", r)
    }

    pub(crate) fn report_status(
        &self,
        credential: &str,
        report: &StatusReport,
    ) -> anyhow::Result<()> {
        let r = self
            .agent
            .post(&self.url("/api/v1/node/status"))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(report);
        Self::no_content("reporting status", r)
    }

    pub(crate) fn rotate_key(
        &self,
        credential: &str,
        req: &RotateKeyRequest,
    ) -> anyhow::Result<()> {
        let r = self
            .agent
            .post(&self.url("/api/v1/node/rotate-key"))
            .set("Authorization", &format!("Bearer {credential}"))
            .send_json(req);
        Self::no_content("rotating the key", r)
    }

    /// Opens the netmap stream, resuming from `since`.
    pub(crate) fn stream(
        &self,
        credential: &str,
        since: Option<u64>,
    ) -> anyhow::Result<EventReader<Box<dyn Read + Send + Sync>>> {
        let mut req = self
            .stream_agent
            .get(&self.url("/api/v1/netmap/stream"))
            .set("Authorization", &format!("Bearer {credential}"))
            .set("Accept", "text/event-stream");
        if let Some(s) = since {
            req = req.query("since", &s.to_string());
        }
        let resp = req
            .call()
            .map_err(|e| api_error("opening the netmap stream", e))?;
        Ok(EventReader::new(resp.into_reader()))
    }
}

/// Why a request failed, with the controller's error code when it sent one.
#[derive(Debug, thiserror::Error)]
#[error("{what}: controller answered {status} {code}: {message}")]
pub(crate) struct ApiFailure {
    pub(crate) what: String,
    pub(crate) status: u16,
    pub(crate) code: String,
    pub(crate) message: String,
}

/// Largest response body read from the controller: a signed full netmap of 10,000 peers is
/// a few MB. Anything longer is an error, not an allocation the controller (or whoever
/// impersonates it) can make us do.
const MAX_RESPONSE_BYTES: u64 = 32 << 20;
/// Largest error body read (a JSON `{"error":{…}}`).
const MAX_ERROR_BYTES: u64 = 64 << 10;
/// Largest event on the netmap stream (a full netmap, as [`MAX_RESPONSE_BYTES`]).
const MAX_EVENT_BYTES: usize = 32 << 20;

/// Reads all of `r`, failing once it passes `cap` bytes.
fn read_capped(r: impl Read, cap: u64) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    r.take(cap + 1).read_to_end(&mut body)?;
    if body.len() as u64 > cap {
        anyhow::bail!("longer than {cap} bytes");
    }
    Ok(body)
}

fn api_error(what: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(status, resp) => {
            let body: serde_json::Value = read_capped(resp.into_reader(), MAX_ERROR_BYTES)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            anyhow::Error::new(ApiFailure {
                what: what.to_string(),
                status,
                code: body["error"]["code"].as_str().unwrap_or("?").to_string(),
                message: body["error"]["message"].as_str().unwrap_or("").to_string(),
            })
        }
        other => anyhow::Error::new(other).context(format!("{what}: controller unreachable")),
    }
}

/// True if the controller says this node was cut off (revoked or expired): the one answer that
/// makes the agent leave the mesh. An unknown credential (401) is not: a controller restored
/// from an old backup or a misrouted proxy must not tear a working mesh down (fail-static).
pub(crate) fn is_credential_refused(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiFailure>().is_some_and(|f| {
        f.status == 403 && matches!(f.code.as_str(), "node_revoked" | "node_expired")
    })
}

/// Parses Server-Sent Events from a byte stream.
pub(crate) struct EventReader<R> {
    inner: BufReader<R>,
    line: String,
}

impl<R: Read> EventReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        EventReader {
            inner: BufReader::new(inner),
            line: String::new(),
        }
    }

    /// The next event; `Ok(None)` at the end of the stream. Comments (keep-alives) are skipped;
    /// an event whose data does not parse, or that grows past [`MAX_EVENT_BYTES`], is an error
    /// (the caller reconnects): memory stays bounded whatever the other end sends.
    pub(crate) fn next_event(&mut self) -> anyhow::Result<Option<StreamEvent>> {
        let mut data = String::new();
        loop {
            self.line.clear();
            let room = MAX_EVENT_BYTES.saturating_sub(data.len()) as u64 + 2;
            let n = (&mut self.inner)
                .take(room)
                .read_line(&mut self.line)
                .context("reading the netmap stream")?;
            if n == 0 {
                return Ok(None);
            }
            if !self.line.ends_with('\n') && n as u64 == room {
                anyhow::bail!("netmap stream event longer than {MAX_EVENT_BYTES} bytes");
            }
            let line = self.line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                let event = serde_json::from_str(&data).context("malformed stream event")?;
                return Ok(Some(event));
            }
            if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
            // `event:`, `id:`, `retry:` and `:` comments carry nothing we need.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_stream_event_is_an_error_with_bounded_memory() {
        // An endless line: the reader gives up after MAX_EVENT_BYTES, not at the end of memory.
        let endless = std::io::repeat(b'x');
        let mut r = EventReader::new(Read::chain(&b"data: "[..], endless));
        let e = r.next_event().expect_err("too long");
        assert!(e.to_string().contains("longer than"), "{e}");
        assert!(
            r.line.capacity() <= 2 * MAX_EVENT_BYTES,
            "{}",
            r.line.capacity()
        );
        // Many data lines adding up past the cap are refused too.
        let line = format!("data: {}\n", "y".repeat(1 << 20));
        let many = line.repeat(40);
        let mut r = EventReader::new(many.as_bytes());
        assert!(r.next_event().is_err());
        // A capped response body likewise.
        assert!(read_capped(&b"12345"[..], 4).is_err());
        assert_eq!(read_capped(&b"1234"[..], 4).expect("fits"), b"1234");
    }

    #[test]
    fn sse_events_are_parsed_and_keepalives_skipped() {
        let text = ": keep-alive\n\nevent: revoked\nid: 3\ndata: {\"type\":\"revoked\"}\n\n\
                    :\n\nevent: x\ndata: {\"type\":\"future\"}\r\n\r\n";
        let mut r = EventReader::new(text.as_bytes());
        assert_eq!(r.next_event().expect("ok"), Some(StreamEvent::Revoked));
        assert_eq!(r.next_event().expect("ok"), Some(StreamEvent::Unknown));
        assert_eq!(r.next_event().expect("ok"), None);
        let mut bad = EventReader::new("data: {nope\n\n".as_bytes());
        assert!(bad.next_event().is_err());
    }

    #[test]
    fn only_revocation_or_expiry_makes_the_agent_leave() {
        let failure = |status, code: &str| {
            anyhow::Error::new(ApiFailure {
                what: "x".into(),
                status,
                code: code.into(),
                message: String::new(),
            })
        };
        assert!(is_credential_refused(&failure(403, "node_revoked")));
        assert!(is_credential_refused(&failure(403, "node_expired")));
        assert!(!is_credential_refused(&failure(401, "unauthorized")));
        assert!(!is_credential_refused(&failure(503, "internal")));
        assert!(!is_credential_refused(&anyhow::anyhow!(
            "connection refused"
        )));
    }

    #[test]
    fn plain_http_needs_an_explicit_allowance() {
        let opts = |url: &str, allow_http| ControllerOptions {
            url: url.into(),
            ca: None,
            allow_http,
        };
        assert!(Client::new(&opts("http://127.0.0.1:1", false)).is_err());
        assert!(Client::new(&opts("http://127.0.0.1:1", true)).is_ok());
        assert!(Client::new(&opts("https://127.0.0.1:1", false)).is_ok());
        assert!(Client::new(&opts("ftp://x", true)).is_err());
    }
}
