//! A federation's certificates: [`generate`] writes a test PKI (a CA, a server certificate for
//! the names clients dial, one certificate per client id), [`server_tls`] and [`client_tls`]
//! turn such files into TLS settings, and [`client_id`] reads a client's id out of the
//! certificate it presented. Client ids are taken from certificates only, never from messages.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{NetError, io};

/// How long TLS handshakes may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Whether `id` can name a client: 1-64 ASCII letters, digits, `-`, `_` or `.`, not starting
/// with `.` (ids become file names on the server and the client).
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn write(path: &Path, text: &str) -> Result<(), NetError> {
    std::fs::write(path, text).map_err(io(path))?;
    // Private keys are for their owner's eyes only.
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "key") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    }
    Ok(())
}

/// Write a federation's PKI into `out`: `ca.pem` and `ca.key` (keep the key offline: it signs
/// every identity), `server.pem` / `server.key` valid for `server_names` (DNS names or IP
/// addresses), and `ID.pem` / `ID.key` for each client id (the id is the certificate's common name
/// and DNS subject alternative name). Returns the files written.
pub fn generate(
    out: &Path,
    server_names: &[String],
    clients: &[String],
) -> Result<Vec<PathBuf>, NetError> {
    if server_names.is_empty() {
        return Err(NetError::Other(
            "at least one --server-name is needed".into(),
        ));
    }
    for id in clients {
        if !valid_client_id(id) || id == "ca" || id == "server" {
            return Err(NetError::Other(format!(
                "client id {id:?} is not allowed: use 1-64 letters, digits, '-', '_' or '.' \
                 (not starting with '.'; not \"ca\" or \"server\")"
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut written = Vec::new();
    let mut save = |name: &str, text: String| -> Result<(), NetError> {
        let path = out.join(name);
        write(&path, &text)?;
        written.push(path);
        Ok(())
    };

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "fedra federation CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    save("ca.pem", ca_cert.pem())?;
    save("ca.key", ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(server_names.to_vec())?;
    server
        .distinguished_name
        .push(DnType::CommonName, server_names[0].clone());
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    save("server.pem", server.signed_by(&key, &issuer)?.pem())?;
    save("server.key", key.serialize_pem())?;

    for id in clients {
        let mut params = CertificateParams::new(vec![id.clone()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, id.clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        save(&format!("{id}.pem"), params.signed_by(&key, &issuer)?.pem())?;
        save(&format!("{id}.key"), key.serialize_pem())?;
    }
    Ok(written)
}

fn read(path: &Path) -> Result<Vec<u8>, NetError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") {
        return Err(NetError::Certificate {
            path: path.to_path_buf(),
            message: "is not a PEM file".into(),
        });
    }
    Ok(bytes)
}

/// TLS for a server whose files are in `dir` (`ca.pem`, `server.pem`, `server.key`): it proves
/// itself with `server.pem` and requires every client to present a certificate signed by the CA.
pub fn server_tls(dir: &Path) -> Result<ServerTlsConfig, NetError> {
    let ca = read(&dir.join("ca.pem"))?;
    let cert = read(&dir.join("server.pem"))?;
    let key = read(&dir.join("server.key"))?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// TLS for client `id` whose files are in `dir` (`ca.pem`, `ID.pem`, `ID.key`), dialling a
/// server certified for `server_name`. With `identity` false the client presents no
/// certificate (only useful to see the server refuse it).
pub fn client_tls(
    dir: &Path,
    id: &str,
    server_name: &str,
    identity: bool,
) -> Result<ClientTlsConfig, NetError> {
    let ca = read(&dir.join("ca.pem"))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_name)
        .timeout(HANDSHAKE_TIMEOUT);
    if identity {
        let cert = read(&dir.join(format!("{id}.pem")))?;
        let key = read(&dir.join(format!("{id}.key")))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

/// The client id a (CA-verified) certificate carries: its first DNS subject alternative name,
/// else its common name; `None` when it has neither or the id is not a [`valid_client_id`].
pub fn client_id(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::DNSName(name) => Some(name.to_string()),
                _ => None,
            })
        });
    let id = from_san.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    })?;
    valid_client_id(&id).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_client_certificates_carry_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            &["hospital-a".into(), "c1".into()],
        )
        .unwrap();
        assert_eq!(files.len(), 8);
        for id in ["hospital-a", "c1"] {
            let pem = std::fs::read_to_string(dir.path().join(format!("{id}.pem"))).unwrap();
            let der = pem_to_der(&pem);
            assert_eq!(client_id(&der).as_deref(), Some(id));
        }
        // The CA itself names no client.
        let ca = pem_to_der(&std::fs::read_to_string(dir.path().join("ca.pem")).unwrap());
        assert_eq!(client_id(&ca), None);
        assert!(generate(dir.path(), &["localhost".into()], &["../x".into()]).is_err());
        assert!(client_id(b"not a certificate").is_none());
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        parsed.contents
    }
}
