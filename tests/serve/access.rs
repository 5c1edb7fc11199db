//! Who may download what: with a Glance upstream every download, hit or
//! miss, on the sendfile front and on hyper's path, is authorized by the
//! upstream with the client's own token, as Glance's cache middleware
//! does. A fake Glance here holds two tenants' private images.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use super::{ADMIN, Behaviour, Resp, Server, Upstream, get, image_bytes, parse_response, request};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

fn tenants() -> (HashMap<String, Vec<u8>>, HashMap<String, Vec<String>>) {
    let images = HashMap::from([
        ("alice-img".to_string(), image_bytes(60, 300_000)),
        ("bob-img".to_string(), image_bytes(61, 200_000)),
    ]);
    let visible = HashMap::from([
        (ALICE.to_string(), vec!["alice-img".to_string()]),
        (BOB.to_string(), vec!["bob-img".to_string()]),
    ]);
    (images, visible)
}

fn download(s: &Server, id: &str, token: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = token.map(|t| ("X-Auth-Token", t)).into_iter().collect();
    request(
        s.addr,
        "GET",
        &format!("/v2/images/{id}/file"),
        &headers,
        b"",
    )
}

/// HTTP/1.0 goes to hyper's path, not the sendfile front.
fn download_http10(s: &Server, id: &str, token: Option<&str>) -> Resp {
    let mut c = TcpStream::connect(s.addr).unwrap();
    let mut raw = format!("GET /v2/images/{id}/file HTTP/1.0\r\n");
    if let Some(t) = token {
        raw.push_str(&format!("X-Auth-Token: {t}\r\n"));
    }
    raw.push_str("\r\n");
    c.write_all(raw.as_bytes()).unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).unwrap();
    parse_response(&answer, false).unwrap()
}

#[test]
fn a_cached_private_image_is_served_only_to_who_may_download_it() {
    let (images, visible) = tenants();
    let alice_bytes = images["alice-img"].clone();
    let up = Upstream::start_gated(images, Behaviour::Normal, Some(visible));
    let s = Server::start(&["--upstream", &up.url(), "--auth-cache-ttl", "60s"]);

    // No token: 401, on both paths, and nothing fetched.
    for r in [
        download(&s, "alice-img", None),
        download_http10(&s, "alice-img", None),
    ] {
        assert_eq!(r.status, 401, "{}", r.text());
    }
    // Bob cannot see Alice's image: 404, as Glance answers.
    assert_eq!(download(&s, "alice-img", Some(BOB)).status, 404);
    assert_eq!(up.fetches(), 0);

    // Alice fetches it: a miss with her token, then cached.
    let r = download(&s, "alice-img", Some(ALICE));
    assert!(r.complete && r.body == alice_bytes);
    s.wait_cached("alice-img");

    // Cached now, and still not Bob's nor anonymous, on either path.
    for r in [
        download(&s, "alice-img", Some(BOB)),
        download_http10(&s, "alice-img", Some(BOB)),
        request(
            s.addr,
            "HEAD",
            "/v2/images/alice-img/file",
            &[("X-Auth-Token", BOB)],
            b"",
        ),
    ] {
        assert_eq!(r.status, 404, "{}", r.text());
    }
    assert_eq!(
        download(&s, "alice-img", Some("forged-token-0123456789")).status,
        404
    );
    assert_eq!(download(&s, "alice-img", None).status, 401);

    // Alice's hits: from the cache, her decision remembered (no new
    // record requests while it is fresh).
    let records = up.records();
    for _ in 0..3 {
        let r = download(&s, "alice-img", Some(ALICE));
        assert_eq!(r.header("x-image-cache"), Some("hit"));
        assert!(r.complete && r.body == alice_bytes);
    }
    let r = download_http10(&s, "alice-img", Some(ALICE));
    assert!(r.body == alice_bytes);
    assert_eq!(up.records(), records, "a fresh decision asked again");
    assert_eq!(up.fetches(), 1);
    // The token the upstream saw for the fill was Alice's own.
    assert!(up.tokens().iter().any(|t| t == ALICE));

    // The admin token downloads with the upstream token: none is set, so
    // the upstream refuses it.
    assert_eq!(download(&s, "alice-img", Some(ADMIN)).status, 401);
}

#[test]
fn decisions_expire() {
    let (images, visible) = tenants();
    let up = Upstream::start_gated(images, Behaviour::Normal, Some(visible));
    let s = Server::start(&["--upstream", &up.url(), "--auth-cache-ttl", "0s"]);
    for _ in 0..3 {
        assert_eq!(download(&s, "bob-img", Some(BOB)).status, 200);
    }
    assert_eq!(
        up.records(),
        3 + 1,
        "each download asked (and the fill once)"
    );
}

#[test]
fn a_directory_upstream_needs_an_explicit_download_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let out = Command::new(image_cache_tests::cli_binary())
        .arg("--dir")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(store.path())
        .env_remove("IMAGE_CACHE_IMAGE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--public-downloads") && err.contains("--image-token-file"),
        "{err}"
    );
    // Both at once contradict each other.
    let token = dir.path().join("t");
    std::fs::write(&token, "image-token-0123456789").unwrap();
    let out = Command::new(image_cache_tests::cli_binary())
        .arg("--dir")
        .arg(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-downloads",
            "--image-token-file",
        ])
        .arg(&token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contradict"));
    // Public, said explicitly: open.
    let s = Server::start(&["--public-downloads"]);
    assert_eq!(get(s.addr, "/v2/images/none/file").status, 404);
}
