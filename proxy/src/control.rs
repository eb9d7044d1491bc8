//! Connections to the control plane's xDS port (ADS and the certificate service): plaintext
//! gRPC, or gRPC over TLS when the bootstrap names the CA of the control plane's certificate
//! (`xdsCaFile`: the control plane's `<data-dir>/api-ca.pem` unless it was given its own
//! certificate). Workload tokens and certificates then never cross the network in clear.

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The gRPC endpoint for `address` (`HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`):
/// TLS, checking the server's certificate against `ca_file` and the host name or IP address
/// dialled, when `ca_file` is given; plaintext otherwise.
pub fn endpoint(address: &str, ca_file: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = match address.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, address),
    };
    let tls = match (scheme, ca_file.is_empty()) {
        (Some("https"), true) => {
            return Err(format!("{address}: https:// needs xdsCaFile (the CA of the control plane's certificate)"));
        }
        (Some("http"), false) => {
            return Err(format!("{address}: xdsCaFile is set, so the control plane is reached over TLS; drop http://"));
        }
        (Some("http" | "https") | None, no_ca) => !no_ca,
        (Some(other), _) => return Err(format!("{address}: scheme {other}:// (http or https)")),
    };
    let host = rest.rsplit_once(':').map(|(h, _)| h).unwrap_or(rest).trim_start_matches('[').trim_end_matches(']');
    let uri = format!("{}://{rest}", if tls { "https" } else { "http" });
    let endpoint = Endpoint::from_shared(uri).map_err(|e| format!("{address}: {e}"))?;
    if !tls {
        return Ok(endpoint);
    }
    let pem = std::fs::read(ca_file).map_err(|e| format!("xdsCaFile {ca_file}: {e}"))?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    match CertificateDer::pem_slice_iter(&pem).next() {
        Some(Ok(_)) => {}
        Some(Err(e)) => return Err(format!("xdsCaFile {ca_file}: not a PEM certificate: {e:?}")),
        None => return Err(format!("xdsCaFile {ca_file}: no PEM certificate in it")),
    }
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name(host);
    endpoint.tls_config(tls).map_err(|e| format!("xdsCaFile {ca_file}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_ca_files_must_agree() {
        assert_eq!(endpoint("127.0.0.1:15010", "").unwrap().uri().scheme_str(), Some("http"));
        assert_eq!(endpoint("http://127.0.0.1:15010", "").unwrap().uri().scheme_str(), Some("http"));
        let e = endpoint("https://cp.example.com:15010", "").unwrap_err();
        assert!(e.contains("needs xdsCaFile"), "{e}");
        let e = endpoint("http://cp.example.com:15010", "/nonexistent/ca.pem").unwrap_err();
        assert!(e.contains("drop http://"), "{e}");
        let e = endpoint("cp.example.com:15010", "/nonexistent/ca.pem").unwrap_err();
        assert!(e.contains("xdsCaFile /nonexistent/ca.pem"), "{e}");
        let e = endpoint("grpc://cp:1", "").unwrap_err();
        assert!(e.contains("scheme grpc"), "{e}");
        let dir = std::env::temp_dir().join(format!("trellis-control-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = endpoint("cp:15010", &not_pem.display().to_string()).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let ca = rcgen::generate_simple_self_signed(vec!["cp.example.com".into()]).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let ok = endpoint("cp.example.com:15010", &ca_file.display().to_string()).unwrap();
        assert_eq!(ok.uri().scheme_str(), Some("https"));
        assert_eq!(ok.uri().host(), Some("cp.example.com"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
