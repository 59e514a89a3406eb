//! The cluster's public-key infrastructure: a CA made by `--init` (its key never leaves the
//! manager's state directory), node certificates signed from CSRs (a node's private key never
//! leaves the node), Swarm-style join tokens, and the rustls configurations of both ends.
//!
//! A join token is `SWMTKN-1-<sha256 of the CA certificate, hex>-<secret>`. The digest lets a
//! joining node verify the manager before it trusts anything it says (no trust on first use);
//! the secret proves to the manager that the joiner was given the token.
//!
//! A node certificate carries the node's name (common name) and its role, as Swarm's do: the
//! organizational unit is `swarm-manager` or `swarm-worker`. The manager authorizes from the
//! role of the certificate it verified, never from what a node says. Node certificates last
//! `--cert-expiry` (90 days by default) and are renewed over the session before they expire.

use crate::durable;
use protocol::control::MANAGER_SERVER_NAME;
use protocol::state::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::digest::{digest, SHA256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The cluster CA lasts 20 years (Swarm's root CA does too).
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
/// The manager's own server certificate, made fresh at each start.
const MANAGER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// How long node certificates last unless `--cert-expiry` says otherwise (Swarm's 90 days).
pub const DEFAULT_CERT_EXPIRY: Duration = Duration::from_secs(90 * 86_400);
/// A certificate is valid from a little before it was made (clocks differ), at most this.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The organizational unit that carries a node certificate's role.
pub const MANAGER_OU: &str = "swarm-manager";
pub const WORKER_OU: &str = "swarm-worker";

pub fn role_ou(role: Role) -> &'static str {
    match role {
        Role::Manager => MANAGER_OU,
        Role::Worker => WORKER_OU,
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Valid for `lifetime` from now, backdated by a tenth of it (an hour at most) for clock
/// differences, with a random serial number.
fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    let back = BACKDATE.min(lifetime / 10);
    params.not_before = now - time::Duration::seconds(back.as_secs() as i64);
    params.not_after =
        now + time::Duration::seconds(lifetime.as_secs().min(i64::MAX as u64) as i64);
    let mut serial: [u8; 16] = rand::random();
    // A positive DER integer, never zero.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

/// The cluster CA: certificate and key, as PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "overlay cluster CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        cert_der(&self.cert_pem)
    }

    /// Signs a certificate for `public` with the given common name, SANs, purpose, role
    /// (a node's) and lifetime.
    fn sign(
        &self,
        cn: &str,
        sans: Vec<String>,
        role: Option<Role>,
        lifetime: Duration,
        public: &impl rcgen::PublicKeyData,
    ) -> Result<String, PkiError> {
        let client = role.is_some();
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(role) = role {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, role_ou(role));
        }
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        validity(&mut params, lifetime);
        Ok(params.signed_by(public, &issuer)?.pem())
    }

    /// Signs a node's CSR for `role`, valid for `lifetime`. The name and role in the
    /// certificate are the ones the manager decided, not whatever the CSR asked for.
    pub fn sign_node_csr(
        &self,
        node: &str,
        role: Role,
        lifetime: Duration,
        csr_pem: &str,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("invalid CSR: {e}")))?;
        self.sign(
            node,
            vec![node.to_string()],
            Some(role),
            lifetime,
            &csr.public_key,
        )
    }

    /// A fresh key and server certificate for the manager's QUIC endpoint.
    pub fn manager_identity(&self) -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.sign(
            "overlay manager",
            vec![MANAGER_SERVER_NAME.to_string()],
            None,
            MANAGER_VALIDITY,
            &key,
        )?;
        Ok(Identity {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

/// A certificate and its private key, as PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a node's key pair and a CSR for it; the key stays with the node.
pub fn node_key_and_csr(node: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, node);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

pub fn cert_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("bad certificate PEM: {e}")))
}

fn key_der(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    let key = KeyPair::from_pem(pem)?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.serialize_der(),
    )))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn ca_digest(ca_der: &[u8]) -> String {
    hex(digest(&SHA256, ca_der).as_ref())
}

/// A random secret for join tokens.
pub fn new_secret() -> String {
    crate::ids::new_id()
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_digest: String,
    pub secret: String,
}

impl Token {
    pub fn render(&self) -> String {
        format!("SWMTKN-1-{}-{}", self.ca_digest, self.secret)
    }

    pub fn parse(s: &str) -> Result<Token, PkiError> {
        let bad = || {
            PkiError::Invalid("malformed join token: expected SWMTKN-1-<64 hex>-<secret>".into())
        };
        let rest = s.trim().strip_prefix("SWMTKN-1-").ok_or_else(bad)?;
        let (digest, secret) = rest.split_once('-').ok_or_else(bad)?;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty()
        {
            return Err(bad());
        }
        Ok(Token {
            ca_digest: digest.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }
}

/// Constant-time comparison of a presented secret with the expected one.
pub fn secret_matches(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.len() == expected.len() && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

fn roots(ca_der: CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der)?;
    Ok(Arc::new(roots))
}

pub const ALPN: &[u8] = b"overlay/1";

/// The manager's TLS config: its server certificate, and client certificates verified against
/// the cluster CA when presented (a joining node has none yet and may only join).
pub fn server_config(ca: &Ca, id: &Identity) -> Result<rustls::ServerConfig, PkiError> {
    let ca_der = ca.cert_der()?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der.clone())?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert_der(&id.cert_pem)?, ca_der], key_der(&id.key_pem)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A member node's TLS config: the manager must chain to the cluster CA, and the node
/// authenticates with its own certificate.
pub fn member_client_config(
    ca_pem: &str,
    node: &Identity,
) -> Result<rustls::ClientConfig, PkiError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(cert_der(ca_pem)?)?)
        .with_client_auth_cert(vec![cert_der(&node.cert_pem)?], key_der(&node.key_pem)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A joining node's TLS config: it has no CA yet, so it accepts the manager only if the
/// manager's chain includes a CA whose digest is the token's, and the leaf verifies against it.
pub fn join_client_config(token: &Token) -> Result<rustls::ClientConfig, PkiError> {
    let verifier = Arc::new(PinnedCa {
        digest: token.ca_digest.clone(),
        provider: provider(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct PinnedCa {
    digest: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_digest(c.as_ref()) == self.digest)
            .ok_or_else(|| {
                rustls::Error::General("manager's CA does not match the join token".into())
            })?;
        let roots =
            roots(ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the control plane reads from a verified node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The common name: the node's name.
    pub name: String,
    /// The role its organizational unit carries; `None` for certificates made before roles
    /// existed (they count as a worker's).
    pub role: Option<Role>,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

/// Reads name, role, serial and validity from a certificate (DER).
pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = cert
        .subject()
        .iter_organizational_unit()
        .find_map(|ou| match ou.as_str().ok()? {
            MANAGER_OU => Some(Role::Manager),
            WORKER_OU => Some(Role::Worker),
            _ => None,
        });
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Some(CertInfo {
        name,
        role,
        serial: hex(cert.tbs_certificate.raw_serial()),
        not_before: secs(cert.validity().not_before),
        not_after: secs(cert.validity().not_after),
    })
}

/// The same, from PEM.
pub fn cert_info_pem(pem: &str) -> Option<CertInfo> {
    cert_info(cert_der(pem).ok()?.as_ref())
}

/// Whether the certificate `cert_pem` is for the private key `key_pem` (a renewal's answer
/// must be for the key the node just made).
pub fn cert_matches_key(cert_pem: &str, key_pem: &str) -> bool {
    let (Ok(der), Ok(key)) = (cert_der(cert_pem), KeyPair::from_pem(key_pem)) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// Reads a file of this PKI, with the path in the error.
pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path)
        .map_err(|e| PkiError::Invalid(format!("reading {}: {e}", path.display())))
}

/// Writes a file of this PKI readable by root only (mode 0600), replacing it atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    durable::write_atomic(path, contents.as_bytes(), durable::PRIVATE)
        .map_err(|e| PkiError::Invalid(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_and_reject_garbage() {
        let t = Token {
            ca_digest: "ab".repeat(32),
            secret: "s3cr3t".into(),
        };
        assert_eq!(Token::parse(&t.render()).unwrap(), t);
        for bad in [
            "",
            "SWMTKN-1-",
            "SWMTKN-1-abc-x",
            "SWMTKN-2-".to_string().as_str(),
            &format!("SWMTKN-1-{}-", "ab".repeat(32)),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
        assert!(secret_matches("abc", "abc"));
        assert!(!secret_matches("abc", "abd"));
        assert!(!secret_matches("abc", "abcd"));
    }

    #[test]
    fn node_certificates_carry_the_admitted_name_role_and_expiry() {
        let ca = Ca::generate().unwrap();
        let (_key, csr) = node_key_and_csr("evil-name").unwrap();
        let day = Duration::from_secs(86_400);
        let cert = ca.sign_node_csr("n2", Role::Manager, day, &csr).unwrap();
        let der = cert_der(&cert).unwrap();
        assert_eq!(
            cert_info(der.as_ref()).map(|c| c.name).as_deref(),
            Some("n2")
        );
        let info = cert_info(der.as_ref()).unwrap();
        assert_eq!(info.role, Some(Role::Manager));
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        assert!(info.not_after.abs_diff(now + 86_400) < 5, "{info:?}");
        assert!(info.not_before.abs_diff(now - 3600) < 5, "{info:?}");
        assert!(cert_matches_key(&cert, &_key));
        let (other_key, _) = node_key_and_csr("n2").unwrap();
        assert!(!cert_matches_key(&cert, &other_key));
        // Short lifetimes are backdated by a tenth; serials differ.
        let short = ca
            .sign_node_csr("n2", Role::Worker, Duration::from_secs(30), &csr)
            .unwrap();
        let short = cert_info_pem(&short).unwrap();
        assert_eq!(short.role, Some(Role::Worker));
        assert_eq!(short.not_after - short.not_before, 33);
        assert_ne!(short.serial, info.serial);
        assert!(ca
            .sign_node_csr("n2", Role::Worker, day, "garbage")
            .is_err());
        // The configs build with these materials.
        let id = ca.manager_identity().unwrap();
        server_config(&ca, &id).unwrap();
        let node = Identity {
            cert_pem: cert,
            key_pem: _key,
        };
        member_client_config(&ca.cert_pem, &node).unwrap();
    }
}
