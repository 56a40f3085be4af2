//! Registries that ask for credentials: a token issuer for docker-registry's
//! Bearer flow, and htpasswd files for its Basic one.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The registry's `auth:` block for Basic auth of `users` (user, password),
/// with the htpasswd file (bcrypt, by apache2-utils' `htpasswd`) in `dir`.
pub fn htpasswd_config(dir: &Path, users: &[(&str, &str)]) -> String {
    let file = dir.join("htpasswd");
    let mut text = Vec::new();
    for (user, password) in users {
        let out = std::process::Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd (apache2-utils) is needed");
        assert!(out.status.success(), "htpasswd (apache2-utils) is needed");
        text.extend_from_slice(out.stdout.trim_ascii_end());
        text.push(b'\n');
    }
    std::fs::write(&file, text).unwrap();
    format!(
        "auth:\n  htpasswd:\n    realm: lazylayer-test\n    path: {}\n",
        file.display()
    )
}

/// A token issuer for a real docker-registry configured for token auth:
/// the registry verifies RS256 JWTs signed by a key whose certificate it
/// trusts. The issuer is a small HTTP endpoint in the test that signs with
/// `openssl` (no mock: the registry does the verifying). It grants the
/// scopes asked for only to a client that sends Basic alice:s3cret-pw.
pub struct TokenIssuer {
    port: u16,
    /// Tokens issued so far.
    issued: Arc<AtomicUsize>,
    keys: tempfile::TempDir,
}

/// Who the issuer grants what: a user, a password, and the repositories
/// (names starting with `prefix`; "" for all) that user may pull and push.
#[derive(Clone, Debug)]
pub struct Grant {
    pub user: String,
    pub password: String,
    pub prefix: String,
}

impl Grant {
    pub fn new(user: &str, password: &str, prefix: &str) -> Grant {
        Grant {
            user: user.into(),
            password: password.into(),
            prefix: prefix.into(),
        }
    }

    fn basic(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.user, self.password))
    }
}

impl TokenIssuer {
    /// alice (password s3cret-pw) may do anything.
    pub fn start() -> TokenIssuer {
        TokenIssuer::start_granting(vec![Grant::new("alice", "s3cret-pw", "")])
    }

    /// An issuer granting each request what the grant of the credential it
    /// carries allows (nothing to an anonymous or unknown one).
    pub fn start_granting(grants: Vec<Grant>) -> TokenIssuer {
        let keys = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = Arc::new(AtomicUsize::new(0));
        let issuer = TokenIssuer { port, issued, keys };
        issuer.new_signing_key();
        let (issued, key, cert) = (issuer.issued.clone(), issuer.key(), issuer.cert());
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = vec![0u8; 8192];
                let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let resp = match Self::answer(&req, &grants) {
                    Ok(()) => {
                        let token = Self::sign(
                            &req,
                            &grants,
                            &key,
                            &cert,
                            issued.fetch_add(1, Ordering::SeqCst),
                        );
                        // Both names, as Docker's token servers answer.
                        let body = format!(
                            r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#
                        );
                        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                    }
                    Err(status) => format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                };
                let _ = conn.write_all(resp.as_bytes());
            }
        });
        issuer
    }

    fn key(&self) -> std::path::PathBuf {
        self.keys.path().join("key.pem")
    }

    fn cert(&self) -> std::path::PathBuf {
        self.keys.path().join("cert.pem")
    }

    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// A new key and certificate in place of the old (the registry trusts
    /// the new one once restarted, and refuses tokens signed by the old).
    pub fn new_signing_key(&self) {
        let st = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=lazylayer-test-issuer", "-keyout"])
            .arg(self.key())
            .arg("-out")
            .arg(self.cert())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// The registry's `auth:` block trusting this issuer.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: lazylayer-test\n    issuer: lazylayer-test-issuer\n    rootcertbundle: {}\n",
            self.port,
            self.cert().display()
        )
    }

    /// Whether to issue a token for `req`: only for a GET (the OAuth2 POST
    /// form is not served: 404, on which clients fall back to GET, as with
    /// GCR), anonymous (then granting nothing) or with the credential of a
    /// grant; a credential no grant has is refused (401), as real token
    /// servers refuse a wrong password.
    fn answer(req: &str, grants: &[Grant]) -> Result<(), &'static str> {
        if !req.starts_with("GET ") {
            return Err("404 Not Found");
        }
        let basic = req.lines().find_map(|l| {
            let lower = l.to_ascii_lowercase();
            lower
                .starts_with("authorization: basic ")
                .then(|| l["authorization: basic ".len()..].trim().to_string())
        });
        match basic {
            None => Ok(()),
            Some(b) if grants.iter().any(|g| g.basic() == b) => Ok(()),
            Some(_) => Err("401 Unauthorized"),
        }
    }

    /// A JWT answering the token request `req` (GET /token?service=..&scope=..),
    /// granting the scopes the grant of its credential allows.
    fn sign(req: &str, grants: &[Grant], key: &Path, cert: &Path, jti: usize) -> String {
        let grant = grants.iter().find(|g| {
            req.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("authorization: basic ")
                    && l.trim_end().ends_with(&g.basic())
            })
        });
        let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
        let query = path
            .split_once('?')
            .map(|(_, q)| q.to_string())
            .unwrap_or_default();
        let mut access = Vec::new();
        for kv in query.split('&') {
            if let Some(v) = kv.strip_prefix("scope=") {
                let v = v
                    .replace("%3A", ":")
                    .replace("%2F", "/")
                    .replace("%2C", ",");
                let parts: Vec<&str> = v.splitn(3, ':').collect();
                if parts.len() == 3 && grant.is_some_and(|g| parts[1].starts_with(&g.prefix)) {
                    let actions: Vec<String> =
                        parts[2].split(',').map(|a| format!("\"{a}\"")).collect();
                    access.push(format!(
                        r#"{{"type":"{}","name":"{}","actions":[{}]}}"#,
                        parts[0],
                        parts[1],
                        actions.join(",")
                    ));
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let b64 = |d: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
        };
        // x5c is the certificate's DER in standard base64: the PEM's body.
        // Read at each request, so that a new signing key takes effect.
        let pem = std::fs::read_to_string(cert).unwrap();
        let x5c: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let header = format!(r#"{{"typ":"JWT","alg":"RS256","x5c":["{x5c}"]}}"#);
        let claims = format!(
            r#"{{"iss":"lazylayer-test-issuer","sub":"{}","aud":"lazylayer-test","exp":{},"nbf":{},"iat":{},"jti":"{}","access":[{}]}}"#,
            grant.map_or("anonymous", |g| g.user.as_str()),
            now + 300,
            now - 10,
            now,
            jti,
            access.join(",")
        );
        let signing_input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let mut child = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
        let sig = child.wait_with_output().unwrap().stdout;
        format!("{signing_input}.{}", b64(&sig))
    }
}
