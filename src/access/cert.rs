//! Client certificates (`auth.client_ca`, TLS only): the verifier the TLS listener asks
//! for them with, and the principal a verified certificate names (its subject's common
//! name). A client without a certificate is let through to the other ways of
//! authenticating; a certificate that does not verify fails the handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use x509_cert::der::asn1::{PrintableStringRef, Utf8StringRef};
use x509_cert::der::Decode;

/// The principal of a connection's verified client certificate, on each of its requests.
#[derive(Clone, Debug)]
pub struct ClientCert(pub Arc<str>);

/// Verifies client certificates against the CAs in `ca` (PEM); clients may also present
/// none.
pub fn verifier(ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let at = || format!("auth.client_ca {}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", at()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", at()));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| format!("{}: {e}", at()))?;
    }
    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("{}: {e}", at()))
}

/// The subject's common name of a (verified) certificate, if it is a usable principal
/// name: printable, without `/` or `:`, not `anonymous`.
pub fn principal(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let cn = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == const_oid_cn())?;
    let name = Utf8StringRef::try_from(&cn.value)
        .map(|s| s.as_str().to_owned())
        .or_else(|_| PrintableStringRef::try_from(&cn.value).map(|s| s.as_str().to_owned()))
        .ok()?;
    super::identity::valid_principal(&name).then(|| Arc::from(name))
}

/// `id-at-commonName`, 2.5.4.3.
fn const_oid_cn() -> x509_cert::der::oid::ObjectIdentifier {
    x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3")
}
