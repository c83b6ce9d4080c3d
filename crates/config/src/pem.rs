//! PEM files read into DER bytes with `rustls-pki-types`: certificate chains and
//! private keys. Pure parsing; whether a key suits a certificate, and every TLS object
//! built from them, is the loaders' business.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The PEM certificates in `file` (at least one), or why not.
pub fn certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_file_iter(file).and_then(|it| it.collect());
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(format!("{} holds no PEM certificate", file.display())),
        Err(e) => Err(format!(
            "{} is not a PEM certificate file: {e}",
            file.display()
        )),
    }
}

/// The PEM private key in `file`, or why not.
pub fn key(file: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(file)
        .map_err(|e| format!("{} holds no usable private key: {e}", file.display()))
}
