//! Answers no real registry gives, from a peer speaking real HTTP on
//! loopback: docker-registry cannot be made to send them.

use std::io::{Read, Write};
use std::net::TcpListener;

use lazylayer_oci::{ClientConfig, Digest, RegistryClient, Repository};

/// Serve `response` to every connection on a loopback port, after reading
/// the request's head.
fn serve_forever(response: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = conn.write_all(response.as_bytes());
        }
    });
    port
}

/// Issue #19: a 206 whose Content-Range ends at u64::MAX. `end + 1`
/// overflowed: a panic in debug builds ("attempt to add with overflow"), a
/// range end of 0 in release builds, which a resume then took 1 from.
#[tokio::test]
async fn content_range_ending_at_u64_max_is_refused() {
    let port = serve_forever(
        "HTTP/1.1 206 Partial Content\r\n\
         Content-Range: bytes 0-18446744073709551615/*\r\n\
         Content-Length: 4\r\n\
         Connection: close\r\n\r\nabcd",
    );
    let client = RegistryClient::new(ClientConfig {
        max_attempts: 1,
        ..ClientConfig::default()
    })
    .unwrap();
    let repo = Repository {
        registry: format!("127.0.0.1:{port}"),
        name: "hostile/image".into(),
    };
    let digest = Digest::sha256_of(b"abcd");
    let err = client
        .get_blob_range_only(&repo, &digest, 0, 4)
        .await
        .expect_err("a Content-Range ending at u64::MAX was accepted");
    assert!(
        err.to_string().contains("Content-Range"),
        "the error names the header: {err}"
    );
}
