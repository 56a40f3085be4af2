//! What Podman's `additional-layer-store-auth-helper` receives: Podman
//! (containers/image ≥ 5.32) runs the program named by that registries.conf
//! key once per image it pulls, after the manifest, before it asks the
//! additional layer store for layers, with JSON on stdin:
//! `{"<registry/repository:tag or @digest>": {"username": "...",
//! "password": "...", "identityToken": "..."}}` (empty fields left out;
//! `{}` for an anonymous pull). lazylayer's helper passes it to the running
//! store, which uses the credential for that repository's lazy fetches.
//! The input is untrusted: bounded, and a malformed one is an error naming
//! no secret.

use std::collections::BTreeMap;

use lazylayer_oci::auth::Credential;
use lazylayer_oci::Reference;

/// More than any real input (one reference and one credential).
pub const MAX_INPUT: usize = 64 << 10;

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    identity_token: String,
}

/// One image the helper was told about, and its credential if it has one
/// lazylayer can use (username and password; an identity token is not).
#[derive(Debug)]
pub struct HelperEntry {
    pub reference: Reference,
    pub credential: Option<Credential>,
    /// An identity token was given (and left unused).
    pub identity_token: bool,
}

pub fn parse_helper_input(input: &[u8]) -> Result<Vec<HelperEntry>, String> {
    if input.len() > MAX_INPUT {
        return Err(format!(
            "input of {} bytes, more than {MAX_INPUT}",
            input.len()
        ));
    }
    let map: BTreeMap<String, Entry> = serde_json::from_slice(input).map_err(|e| {
        format!(
            "not the auth helper's JSON object (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let mut out = Vec::new();
    for (name, e) in map {
        let reference: Reference = name
            .parse()
            .map_err(|err| format!("image reference {name:?}: {err}"))?;
        let credential = (!e.username.is_empty() && !e.password.is_empty()).then_some(Credential {
            username: e.username,
            password: e.password,
        });
        out.push(HelperEntry {
            reference,
            credential,
            identity_token: !e.identity_token.is_empty(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podmans_input_is_read() {
        let v = parse_helper_input(
            br#"{"reg.example:5000/team/app:v1":{"username":"alice","password":"pw"}}"#,
        )
        .unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].reference.repository.registry, "reg.example:5000");
        assert_eq!(v[0].reference.repository.name, "team/app");
        let c = v[0].credential.as_ref().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "pw"));
        // Anonymous, and by digest.
        let d = format!("reg.example/app@sha256:{}", "a".repeat(64));
        let v = parse_helper_input(format!(r#"{{"{d}":{{}}}}"#).as_bytes()).unwrap();
        assert!(v[0].credential.is_none() && !v[0].identity_token);
        let v = parse_helper_input(br#"{"reg.example/app:1":{"identityToken":"t"}}"#).unwrap();
        assert!(v[0].credential.is_none() && v[0].identity_token);
    }

    #[test]
    fn hostile_input_is_an_error_without_the_secret() {
        for bad in [
            &b"not json pw-secret"[..],
            br#"["pw-secret"]"#,
            br#"{"reg.example/app:1":{"username":"a","password":7,"x":"pw-secret"}}"#,
            br#"{"::bad ref::":{"username":"a","password":"pw-secret"}}"#,
        ] {
            let e = parse_helper_input(bad).unwrap_err();
            assert!(!e.contains("pw-secret"), "{e}");
        }
        let big = vec![b' '; MAX_INPUT + 1];
        assert!(parse_helper_input(&big).unwrap_err().contains("more than"));
    }
}
