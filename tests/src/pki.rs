//! The cluster's own PKI, made with the openssl command: a CA, the apiserver's serving
//! certificate, an admin client certificate in `system:masters`, and the ServiceAccount
//! signing key pair.

use std::path::{Path, PathBuf};

use base64::Engine;

use crate::error::{Error, Result};
use crate::proc::run;

pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn ec_key(path: &Path) -> Result<()> {
    run(
        "openssl",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            s(path),
        ],
    )
    .map(drop)
}

/// Signs a certificate for `subject` with the CA, with the given X.509v3 extensions.
fn sign(dir: &Path, name: &str, subject: &str, extensions: &str, ca: (&Path, &Path)) -> Result<()> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let crt = dir.join(format!("{name}.crt"));
    let ext = dir.join(format!("{name}.ext"));
    ec_key(&key)?;
    run(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            s(&key),
            "-subj",
            subject,
            "-out",
            s(&csr),
        ],
    )?;
    std::fs::write(&ext, extensions).map_err(Error::io("write extensions", &ext))?;
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(ca.0),
            "-CAkey",
            s(ca.1),
            "-CAcreateserial",
            "-days",
            "365",
            "-sha256",
            "-extfile",
            s(&ext),
            "-out",
            s(&crt),
        ],
    )
    .map(drop)
}

impl Pki {
    /// Generates everything into `dir`; `server_ips` become the apiserver's IP SANs.
    pub fn generate(dir: &Path, server_ips: &[String]) -> Result<Self> {
        let ca_key = dir.join("ca.key");
        let ca_cert = dir.join("ca.crt");
        ec_key(&ca_key)?;
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                s(&ca_key),
                "-subj",
                "/CN=berth-e2e-ca",
                "-days",
                "365",
                "-sha256",
                "-out",
                s(&ca_cert),
            ],
        )?;
        let ca = (ca_cert.as_path(), ca_key.as_path());
        let mut sans = vec![
            "DNS:kubernetes".to_string(),
            "DNS:kubernetes.default".into(),
            "DNS:kubernetes.default.svc".into(),
            "DNS:kubernetes.default.svc.cluster.local".into(),
            "DNS:localhost".into(),
        ];
        sans.extend(server_ips.iter().map(|ip| format!("IP:{ip}")));
        sign(
            dir,
            "apiserver",
            "/CN=kube-apiserver",
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
            ca,
        )?;
        sign(
            dir,
            "admin",
            "/O=system:masters/CN=berth-admin",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n",
            ca,
        )?;
        let sa_key = dir.join("sa.key");
        let sa_pub = dir.join("sa.pub");
        run("openssl", &["genrsa", "-out", s(&sa_key), "2048"])?;
        run(
            "openssl",
            &["rsa", "-in", s(&sa_key), "-pubout", "-out", s(&sa_pub)],
        )?;
        Ok(Self {
            ca_cert,
            ca_key,
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key,
            sa_pub,
        })
    }

    /// An admin kubeconfig with the certificates embedded, so it outlives `dir`.
    pub fn admin_kubeconfig(&self, server: &str) -> Result<String> {
        let b64 = |p: &Path| -> Result<String> {
            let bytes = std::fs::read(p).map_err(Error::io("read certificate", p))?;
            Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
        };
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: berth-e2e\n  cluster:\n    \
             server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: berth-admin\n  \
             user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- \
             name: berth-e2e\n  context:\n    cluster: berth-e2e\n    user: berth-admin\n\
             current-context: berth-e2e\n",
            ca = b64(&self.ca_cert)?,
            cert = b64(&self.admin_cert)?,
            key = b64(&self.admin_key)?,
        ))
    }
}
