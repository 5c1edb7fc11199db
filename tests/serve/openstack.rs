//! Glance's image records (`GET /v2/images/{id}`, `GET /v2/images`), which
//! python-openstackclient and openstacksdk fetch before every per-image
//! call, and the upstream check before queuing: against a fake Glance
//! written here (records, lists, files, keystone-like 401s) and against a
//! directory upstream. `real_openstack_clients` (`#[ignore]`d) runs the
//! real `openstack` CLI and openstacksdk against the server.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use image_cache::checksum::{Algorithm, Hasher};
use serde_json::{Value, json};

use image_cache_tests::cli_binary;

use super::{ADMIN, IMAGE_TOKEN, Resp, Server, admin, get, image_bytes, request, xdg_cache_home};

/// A token the fake Glance accepts for a user.
const USER_TOKEN: &str = "user-token-for-the-openstack-tests";
/// The token this cache sends Glance in its own name (and for a client
/// holding the cache's admin token).
const UPSTREAM_TOKEN: &str = "upstream-token-for-the-openstack-tests";

const A: &str = "11111111-2222-3333-4444-555555555555";
const B: &str = "66666666-7777-8888-9999-000000000000";

fn hex(algorithm: Algorithm, bytes: &[u8]) -> String {
    let mut h = Hasher::new(algorithm);
    h.update(bytes);
    h.finish()
}

// ------------------------------------------------------------ fake Glance

struct Image {
    name: String,
    bytes: Vec<u8>,
}

/// What the fake Glance saw: method, path with query, token.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A Glance API as openstackclient, openstacksdk and the cache use it:
/// records, lists by name, files with `Content-Length` and `Content-MD5`;
/// 401 (keystonemiddleware's JSON) without a token it accepts, and 404 as
/// plain text, as Glance's own.
struct FakeGlance {
    addr: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
}

impl FakeGlance {
    fn start(images: Vec<(&str, &str, Vec<u8>)>) -> FakeGlance {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let images: Arc<HashMap<String, Image>> = Arc::new(
            images
                .into_iter()
                .map(|(id, name, bytes)| {
                    (
                        id.to_string(),
                        Image {
                            name: name.to_string(),
                            bytes,
                        },
                    )
                })
                .collect(),
        );
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (images, s) = (images.clone(), s.clone());
                std::thread::spawn(move || glance_conn(conn, &images, &s));
            }
        });
        FakeGlance { addr, seen, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The tokens of the requests for `target` (path and query).
    fn tokens_for(&self, target: &str) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t, _)| t == target)
            .map(|(_, _, token)| token.clone())
            .collect()
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for FakeGlance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// The record the fake Glance answers for `id`.
fn glance_record(id: &str, image: &Image) -> Value {
    json!({
        "id": id,
        "name": image.name,
        "status": "active",
        "visibility": "shared",
        "protected": false,
        "os_hidden": false,
        "disk_format": "qcow2",
        "container_format": "bare",
        "size": image.bytes.len(),
        "virtual_size": null,
        "checksum": hex(Algorithm::Md5, &image.bytes),
        "os_hash_algo": "sha512",
        "os_hash_value": hex(Algorithm::Sha512, &image.bytes),
        "owner": "0123456789abcdef0123456789abcdef",
        "min_disk": 0,
        "min_ram": 0,
        "tags": [],
        "created_at": "2026-01-02T03:04:05Z",
        "updated_at": "2026-01-02T03:04:06Z",
        "file": format!("/v2/images/{id}/file"),
        "self": format!("/v2/images/{id}"),
        "schema": "/v2/schemas/image",
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], escaped) {
            (_, Some(v)) => {
                out.push(v);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (c, None) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn glance_conn(mut conn: TcpStream, images: &HashMap<String, Image>, seen: &Seen) {
    let Some((method, target, token)) = super::read_request_head(&conn) else {
        return;
    };
    seen.lock()
        .unwrap()
        .push((method.clone(), target.clone(), token.clone()));
    let send = |conn: &mut TcpStream, status: &str, ctype: &str, extra: &str, body: &[u8]| {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = conn.write_all(body);
        }
    };
    if !matches!(token.as_deref(), Some(USER_TOKEN | UPSTREAM_TOKEN)) {
        let body = json!({"error": {"code": 401, "title": "Unauthorized",
            "message": "The request you have made requires authentication."}});
        send(
            &mut conn,
            "401 Unauthorized",
            "application/json",
            "WWW-Authenticate: Keystone uri=\"http://keystone.invalid\"\r\n",
            body.to_string().as_bytes(),
        );
        return;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let not_found = |conn: &mut TcpStream| {
        send(
            conn,
            "404 Not Found",
            "text/plain; charset=UTF-8",
            "",
            b"404 Not Found\n\nThe resource could not be found.\n\n   ",
        )
    };
    if path == "/v2/images" {
        let name = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "name")
            .map(|(_, v)| percent_decode(v));
        let mut ids: Vec<&String> = images
            .iter()
            .filter(|(_, i)| name.as_deref().is_none_or(|n| n == i.name))
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let list: Vec<Value> = ids
            .into_iter()
            .map(|id| glance_record(id, &images[id]))
            .collect();
        let body = json!({"images": list, "schema": "/v2/schemas/images", "first": target});
        send(
            &mut conn,
            "200 OK",
            "application/json",
            "",
            body.to_string().as_bytes(),
        );
        return;
    }
    let Some(rest) = path.strip_prefix("/v2/images/") else {
        return not_found(&mut conn);
    };
    let (id, file) = match rest.strip_suffix("/file") {
        Some(id) => (percent_decode(id), true),
        None => (percent_decode(rest), false),
    };
    let Some(image) = images.get(&id) else {
        return not_found(&mut conn);
    };
    if file {
        let md5 = format!("Content-MD5: {}\r\n", hex(Algorithm::Md5, &image.bytes));
        send(
            &mut conn,
            "200 OK",
            "application/octet-stream",
            &md5,
            &image.bytes,
        );
    } else {
        let body = glance_record(&id, image).to_string();
        send(&mut conn, "200 OK", "application/json", "", body.as_bytes());
    }
}

// ------------------------------------------------------------------ helpers

fn with_token(addr: SocketAddr, method: &str, path: &str, token: &str) -> Resp {
    request(addr, method, path, &[("X-Auth-Token", token)], b"")
}

/// A server in front of `glance` (which authorizes downloads), sending
/// it `UPSTREAM_TOKEN` in its own name.
fn server_for(glance: &FakeGlance, extra: &[&str]) -> Server {
    server_for_url(&glance.url(), extra)
}

fn server_for_url(url: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--upstream",
        url,
        "--prefetch-interval",
        "1h",
        "--auth-cache-ttl",
        "60s",
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in(
        tempfile::tempdir().unwrap(),
        &args,
        &[
            ("IMAGE_CACHE_ADMIN_TOKEN", ADMIN),
            ("IMAGE_CACHE_UPSTREAM_TOKEN", UPSTREAM_TOKEN),
        ],
    )
}

fn queued(s: &Server) -> Value {
    let r = admin(s.addr, "GET", "/v2/cache");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["queued_images"].clone()
}

fn is_json(r: &Resp) {
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        r.headers
    );
}

// -------------------------------------------------------------------- tests

#[test]
fn glance_records_and_lists_are_proxied_with_the_clients_token() {
    let glance = FakeGlance::start(vec![
        (A, "alpha", image_bytes(1, 5000)),
        (B, "beta", image_bytes(2, 7000)),
    ]);
    let s = server_for(&glance, &[]);
    let expected = glance_record(
        A,
        &Image {
            name: "alpha".into(),
            bytes: image_bytes(1, 5000),
        },
    );

    // A user's token goes to Glance as it is; Glance's answer comes back.
    let r = with_token(s.addr, "GET", &format!("/v2/images/{A}"), USER_TOKEN);
    assert_eq!(r.status, 200, "{}", r.text());
    is_json(&r);
    assert_eq!(r.json(), expected);
    assert_eq!(
        glance.tokens_for(&format!("/v2/images/{A}")),
        [Some(USER_TOKEN.to_string())]
    );
    // The cache's admin token is not Glance's: the upstream token goes.
    let r = with_token(s.addr, "GET", &format!("/v2/images/{A}"), ADMIN);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        glance.tokens_for(&format!("/v2/images/{A}")).last(),
        Some(&Some(UPSTREAM_TOKEN.to_string()))
    );

    // No token: 401 here, Glance is not asked.
    let before = glance.requests();
    let r = get(s.addr, &format!("/v2/images/{A}"));
    assert_eq!(r.status, 401, "{}", r.text());
    is_json(&r);
    assert!(r.json()["error"].is_object());
    assert_eq!(glance.requests(), before);
    // A token Glance refuses: Glance's 401 and body.
    let r = with_token(
        s.addr,
        "GET",
        &format!("/v2/images/{A}"),
        "not-a-keystone-token",
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], 401);
    // Unknown: Glance's 404 (its text body becomes a JSON error).
    let unknown = "99999999-9999-9999-9999-999999999999";
    let r = with_token(s.addr, "GET", &format!("/v2/images/{unknown}"), USER_TOKEN);
    assert_eq!(r.status, 404, "{}", r.text());
    is_json(&r);
    assert_eq!(r.json()["error"]["code"], 404);
    // Bad ids never reach Glance.
    let before = glance.requests();
    let r = with_token(s.addr, "GET", "/v2/images/a%2Fb", USER_TOKEN);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(glance.requests(), before);

    // Lists: the query goes as it is (the SDK's find by name).
    let q = "/v2/images?name=alpha&limit=20&sort_key=name&sort_dir=asc";
    let r = with_token(s.addr, "GET", q, USER_TOKEN);
    assert_eq!(r.status, 200, "{}", r.text());
    is_json(&r);
    assert_eq!(r.json()["images"], json!([expected]));
    assert_eq!(glance.tokens_for(q), [Some(USER_TOKEN.to_string())]);
    let r = with_token(s.addr, "GET", "/v2/images?name=gamma", USER_TOKEN);
    assert_eq!(r.json()["images"], json!([]));
    let r = with_token(s.addr, "GET", "/v2/images", USER_TOKEN);
    assert_eq!(r.json()["images"].as_array().unwrap().len(), 2);
    assert_eq!(get(s.addr, "/v2/images?name=alpha").status, 401);

    // Queuing asks Glance first: an image it does not have is refused
    // and not queued; one it has is queued and fetched.
    let r = admin(s.addr, "PUT", &format!("/v2/cache/{unknown}"));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not found upstream"),
        "{}",
        r.text()
    );
    assert_eq!(queued(&s), json!([]));
    assert_eq!(
        glance.tokens_for(&format!("/v2/images/{unknown}")).last(),
        Some(&Some(UPSTREAM_TOKEN.to_string()))
    );
    assert_eq!(admin(s.addr, "PUT", &format!("/v2/cache/{B}")).status, 202);
    s.wait_cached(B);
    assert_eq!(queued(&s), json!([]));
}

#[test]
fn an_unreachable_glance_is_502_and_nothing_is_queued() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let s = server_for_url(&url, &[]);
    let r = with_token(s.addr, "GET", &format!("/v2/images/{A}"), USER_TOKEN);
    assert_eq!(r.status, 502, "{}", r.text());
    is_json(&r);
    let r = with_token(s.addr, "GET", "/v2/images?name=x", USER_TOKEN);
    assert_eq!(r.status, 502, "{}", r.text());
    let r = admin(s.addr, "PUT", &format!("/v2/cache/{A}"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(queued(&s), json!([]));
}

/// `image-cache cache ID --from FILE` into the root `s` will serve.
pub(super) fn cache_with_cli(root: &Path, id: &str, bytes: &[u8]) {
    let src = root.parent().unwrap().join(format!("src-{id}"));
    fs::write(&src, bytes).unwrap();
    let out = Command::new(cli_binary())
        .arg("--dir")
        .arg(root)
        .args(["cache", id, "--from", src.to_str().unwrap()])
        .args(["--checksum", &format!("md5:{}", hex(Algorithm::Md5, bytes))])
        .env("XDG_CACHE_HOME", xdg_cache_home())
        .env_remove("IMAGE_CACHE_DRIVER")
        .env_remove("IMAGE_CACHE_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `image-cache queue ID` on the root a server serves: queued without
/// asking the upstream and without waking the server's prefetcher, so it
/// stays queued (the API refuses what the upstream lacks, and fetches
/// at once what it has).
pub(super) fn queue_with_cli(root: &Path, id: &str) {
    let out = Command::new(cli_binary())
        .arg("--dir")
        .arg(root)
        .args(["queue", id])
        .env("XDG_CACHE_HOME", xdg_cache_home())
        .env_remove("IMAGE_CACHE_DRIVER")
        .env_remove("IMAGE_CACHE_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A root with images `cached-1` and `cached-2` cached, and a server with
/// `upstream` (extra flags) on it, downloads guarded by the image token.
fn server_with_cached(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    cache_with_cli(&root, "cached-1", &image_bytes(3, 3000));
    cache_with_cli(&root, "cached-2", &image_bytes(4, 4000));
    let token_file = dir.path().join("image-token");
    fs::write(&token_file, IMAGE_TOKEN).unwrap();
    let mut args = vec!["--image-token-file", token_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in(dir, &args, &[("IMAGE_CACHE_ADMIN_TOKEN", ADMIN)])
}

#[test]
fn directory_upstream_records_for_cached_and_upstream_images() {
    let store = tempfile::tempdir().unwrap();
    let up = image_bytes(5, 6000);
    fs::write(store.path().join("upstream-only"), &up).unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"not for clients").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), store.path().join("link")).unwrap();
    fs::create_dir(store.path().join("a-directory")).unwrap();
    let s = server_with_cached(&[
        "--upstream",
        store.path().to_str().unwrap(),
        "--prefetch-interval",
        "1h",
    ]);
    let record = |id: &str| with_token(s.addr, "GET", &format!("/v2/images/{id}"), IMAGE_TOKEN);

    // The download's authorization applies.
    assert_eq!(get(s.addr, "/v2/images/cached-1").status, 401);
    let r = with_token(
        s.addr,
        "GET",
        "/v2/images/cached-1",
        "wrong-token-wrong-token",
    );
    assert!(matches!(r.status, 401 | 403), "{}", r.text());
    assert_eq!(get(s.addr, "/v2/images?name=cached-1").status, 401);

    let r = record("cached-1");
    assert_eq!(r.status, 200, "{}", r.text());
    is_json(&r);
    let v = r.json();
    for (k, want) in [
        ("id", json!("cached-1")),
        ("name", json!("cached-1")),
        ("status", json!("active")),
        ("size", json!(3000)),
        ("disk_format", json!("raw")),
        ("container_format", json!("bare")),
        ("visibility", json!("private")),
        ("file", json!("/v2/images/cached-1/file")),
        ("self", json!("/v2/images/cached-1")),
        ("schema", json!("/v2/schemas/image")),
        ("tags", json!([])),
        ("protected", json!(false)),
    ] {
        assert_eq!(v[k], want, "{k} in {v}");
    }
    // The checksum recorded when it was cached, if the driver keeps one.
    let md5 = hex(Algorithm::Md5, &image_bytes(3, 3000));
    assert!(
        v["checksum"].is_null() || v["checksum"] == json!(md5),
        "{v}"
    );
    for k in ["created_at", "updated_at"] {
        let t = v[k].as_str().unwrap();
        assert!(
            t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }

    let r = record("upstream-only");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size"], 6000);
    assert_eq!(r.json()["name"], "upstream-only");
    // A symlink (to anywhere), a directory, nothing: 404, JSON.
    for id in ["link", "a-directory", "nothing"] {
        let r = record(id);
        assert_eq!(r.status, 404, "{id}: {}", r.text());
        is_json(&r);
        assert!(!r.text().contains(store.path().to_str().unwrap()));
    }
    assert_eq!(record("a%2Fb").status, 400);

    // Lists: by name (the id), else the cached images.
    let list = |q: &str| {
        let r = with_token(s.addr, "GET", &format!("/v2/images{q}"), IMAGE_TOKEN);
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        is_json(&r);
        r.json()
    };
    let ids = |v: &Value| -> Vec<String> {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    let v = list("?name=upstream-only&limit=20&sort_key=name");
    assert_eq!(ids(&v), ["upstream-only"]);
    assert_eq!(v["schema"], "/v2/schemas/images");
    assert_eq!(ids(&list("?name=cached-2")), ["cached-2"]);
    assert!(ids(&list("?name=link")).is_empty());
    assert!(ids(&list("?name=nothing")).is_empty());
    assert!(ids(&list("?name=a%2Fb")).is_empty());
    assert!(ids(&list("?name=cached-2&os_hidden=true")).is_empty());
    let v = list("");
    assert_eq!(ids(&v), ["cached-1", "cached-2"]);
    assert!(v.get("next").is_none());
    let v = list("?limit=1");
    assert_eq!(ids(&v), ["cached-1"]);
    let next = v["next"].as_str().unwrap().to_string();
    let v = list(next.strip_prefix("/v2/images").unwrap());
    assert_eq!(ids(&v), ["cached-2"]);
    assert!(v.get("next").is_none());
    let r = with_token(s.addr, "GET", "/v2/images?limit=x", IMAGE_TOKEN);
    assert_eq!(r.status, 400);

    // Queuing: only what the directory holds as a regular file.
    for id in ["nothing", "link", "a-directory"] {
        let r = admin(s.addr, "PUT", &format!("/v2/cache/{id}"));
        assert_eq!(r.status, 404, "{id}: {}", r.text());
        is_json(&r);
    }
    assert_eq!(queued(&s), json!([]));
    assert_eq!(admin(s.addr, "PUT", "/v2/cache/upstream-only").status, 202);
    s.wait_cached("upstream-only");
}

#[test]
fn without_an_upstream_only_cached_images_have_records_and_queue() {
    let s = server_with_cached(&["--prefetch-interval", "1h"]);
    let r = with_token(s.addr, "GET", "/v2/images/cached-2", IMAGE_TOKEN);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size"], 4000);
    let r = with_token(s.addr, "GET", "/v2/images/nothing", IMAGE_TOKEN);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = admin(s.addr, "PUT", "/v2/cache/nothing");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(queued(&s), json!([]));
    // Cached already: accepted, a no-op.
    assert_eq!(admin(s.addr, "PUT", "/v2/cache/cached-1").status, 202);
    assert_eq!(queued(&s), json!([]));
}

// ------------------------------------------------------- the real clients

/// Run with `--ignored`: python-openstackclient's `openstack` (path in
/// `IMAGE_CACHE_TEST_OPENSTACK`) and openstacksdk (the same venv's
/// python) against a server in front of the fake Glance, with token
/// authentication and the server as the image endpoint.
#[test]
#[ignore = "needs python-openstackclient and openstacksdk: set IMAGE_CACHE_TEST_OPENSTACK"]
fn real_openstack_clients() {
    let openstack = match std::env::var_os("IMAGE_CACHE_TEST_OPENSTACK") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "IMAGE_CACHE_TEST_OPENSTACK is not set: run `python3 -m venv .venv-glanceclient && \
             .venv-glanceclient/bin/pip install python-openstackclient openstacksdk` in the \
             repository and set IMAGE_CACHE_TEST_OPENSTACK=$PWD/.venv-glanceclient/bin/openstack"
        ),
    };
    assert!(
        openstack.exists(),
        "IMAGE_CACHE_TEST_OPENSTACK={} does not exist",
        openstack.display()
    );
    let python = openstack.with_file_name("python");
    assert!(python.exists(), "no {} beside openstack", python.display());

    let a_bytes = image_bytes(11, 300_000);
    let b_bytes = image_bytes(12, 70_000);
    let glance = FakeGlance::start(vec![
        (A, "alpha", a_bytes.clone()),
        (B, "beta", b_bytes.clone()),
    ]);
    let s = server_for(&glance, &[]);
    let home = tempfile::tempdir().unwrap();
    let client = |program: &Path| {
        let mut c = Command::new(program);
        c.env("HOME", home.path());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OS_") {
                c.env_remove(k);
            }
        }
        c
    };
    let endpoint = format!("http://{}/v2", s.addr);
    let run = |endpoint: &str, token: &str, args: &[&str]| -> (bool, String, String) {
        let out = client(&openstack)
            .args([
                "--os-auth-type",
                "admin_token",
                "--os-endpoint",
                endpoint,
                "--os-token",
                token,
                "--os-image-api-version",
                "2",
            ])
            .args(args)
            .output()
            .expect("running openstack");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |token: &str, args: &[&str]| -> String {
        let (success, out, err) = run(&endpoint, token, args);
        assert!(
            success,
            "openstack {args:?} failed:\nstdout: {out}\nstderr: {err}\nserver: {}",
            s.log()
        );
        out
    };

    // An empty cache lists nothing (no table at all).
    ok(ADMIN, &["cached", "image", "list"]);
    ok(ADMIN, &["cached", "image", "queue", A]);
    s.wait_cached(A);
    let out = ok(ADMIN, &["cached", "image", "list"]);
    assert!(out.contains(A) && out.contains("cached"), "{out}");
    // An image Glance does not have: the lookup fails, nothing is queued.
    let (success, _, err) = run(
        &endpoint,
        ADMIN,
        &[
            "cached",
            "image",
            "queue",
            "99999999-9999-9999-9999-999999999999",
        ],
    );
    assert!(!success, "{err}");
    assert_eq!(queued(&s), json!([]));

    // image save: a hit (A), a miss (B), and by name.
    let out_dir = tempfile::tempdir().unwrap();
    for (image, bytes) in [(A, &a_bytes), (B, &b_bytes), ("beta", &b_bytes)] {
        let file = out_dir.path().join(format!("{image}.img"));
        ok(
            USER_TOKEN,
            &["image", "save", image, "--file", file.to_str().unwrap()],
        );
        assert!(&fs::read(&file).unwrap() == bytes, "image save {image}");
    }
    s.wait_cached(B);
    // A token Glance refuses cannot save.
    let file = out_dir.path().join("refused.img");
    let (success, _, _) = run(
        &endpoint,
        "not-a-keystone-token",
        &["image", "save", A, "--file", file.to_str().unwrap()],
    );
    assert!(!success);
    assert!(fs::read(&file).map_or(true, |b| b.is_empty()));

    ok(ADMIN, &["cached", "image", "delete", A]);
    assert_eq!(s.cached_ids(), [B]);
    ok(ADMIN, &["cached", "image", "clear"]);
    assert!(s.cached_ids().is_empty());

    // openstacksdk: download (verified against the record's checksums),
    // the cache calls.
    let script = r#"
import json, sys, time
import openstack

endpoint, admin, user, image, out = sys.argv[1:6]

def connect(token):
    return openstack.connect(
        auth_type="admin_token",
        auth={"endpoint": endpoint, "token": token},
        image_api_version="2",
        load_yaml_config=False,
        load_envvars=False,
    )

user_conn, admin_conn = connect(user), connect(admin)
with open(out, "wb") as f:
    user_conn.image.download_image(image, output=f)

def state():
    c = admin_conn.image.get_image_cache()
    return [i["image_id"] for i in c.cached_images], list(c.queued_images)

admin_conn.image.queue_image(image)
deadline = time.time() + 30
while image not in state()[0] and time.time() < deadline:
    time.sleep(0.05)
print(json.dumps({"after_queue": state()}))
admin_conn.image.cache_delete_image(image)
print(json.dumps({"after_delete": state()}))
# Cached again by a download, then cleared.
user_conn.image.download_image(image)
deadline = time.time() + 30
while image not in state()[0] and time.time() < deadline:
    time.sleep(0.05)
admin_conn.image.clear_cache()
print(json.dumps({"after_clear": state()}))
"#;
    let sdk_out = out_dir.path().join("sdk.img");
    let out = client(&python)
        .args(["-c", script, &endpoint, ADMIN, USER_TOKEN, B])
        .arg(&sdk_out)
        .output()
        .expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "openstacksdk failed:\nstdout: {stdout}\nstderr: {}\nserver: {}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    assert!(fs::read(&sdk_out).unwrap() == b_bytes, "download_image");
    let states: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        states,
        [
            json!({"after_queue": [[B], []]}),
            json!({"after_delete": [[], []]}),
            json!({"after_clear": [[], []]}),
        ],
        "{stdout}"
    );
}

/// Warming by a Glance property (`POST /v2/cache/warm` with `property`):
/// the upstream's image list filtered by it (here Glance's `name`
/// filter), read with the upstream token, and only those images filled.
#[test]
fn warming_by_a_glance_property_fills_the_images_it_lists() {
    let glance = FakeGlance::start(vec![
        (A, "ubuntu", image_bytes(1, 5000)),
        (B, "fedora", image_bytes(2, 7000)),
    ]);
    let s = server_for(&glance, &[]);
    let r = request(
        s.addr,
        "POST",
        "/v2/cache/warm",
        &[
            ("X-Auth-Token", ADMIN),
            ("Content-Type", "application/json"),
        ],
        br#"{"property": {"name": "name", "value": "ubuntu"}, "wait": true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    assert_eq!(report["images"], 1, "{report}");
    assert_eq!(report["cached"], 1, "{report}");
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(
        glance.tokens_for("/v2/images?name=ubuntu&limit=200"),
        [Some(UPSTREAM_TOKEN.to_string())]
    );
    let cached: Vec<String> = admin(s.addr, "GET", "/v2/cache").json()["cached_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cached, [A]);
    // The report stays readable by its id; bad requests are 400.
    let id = report["warm"].as_u64().unwrap();
    let again = admin(s.addr, "GET", &format!("/v2/cache/warm/{id}")).json();
    assert_eq!(again["cached"], 1, "{again}");
    for bad in [
        r#"{}"#,
        r#"{"images": ["a"], "top": {"count": 1}}"#,
        r#"{"images": ["a/b"]}"#,
        r#"{"images": ["a"], "concurrency": 0}"#,
        r#"{"images": ["a"], "nodes": ["ftp://x"]}"#,
        r#"not json"#,
    ] {
        let r = request(
            s.addr,
            "POST",
            "/v2/cache/warm",
            &[
                ("X-Auth-Token", ADMIN),
                ("Content-Type", "application/json"),
            ],
            bad.as_bytes(),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        request(s.addr, "POST", "/v2/cache/warm", &[], b"{}").status,
        401
    );
}
