//! Sibling fill (#22): serve nodes on loopback sharing one PostgreSQL
//! through the centralized driver; a miss is read from the node that holds
//! the image, and a sibling that dies mid-stream is taken over by the
//! upstream at the byte it reached.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use image_cache::checksum::{Algorithm, Hasher};
use image_cache_tests::pg;
use image_cache_tests::{cli_binary, image_bytes};

use super::{Running, http_get, http_get_with};

const PEER_TOKEN: &str = "peer-token-0123456789abcdef";

/// A node: its process and its address.
struct Node {
    process: Running,
    addr: String,
}

impl Node {
    /// A serve node on a port of its own, its URL its
    /// worker_self_reference_url, the fleet's peer token set.
    fn start(root: &Path, upstream: &Path, database_url: &str) -> Node {
        Node::start_with_upstream(root, upstream.to_str().unwrap(), database_url)
    }

    /// With `upstream` a directory or a Glance URL.
    fn start_with_upstream(root: &Path, upstream: &str, database_url: &str) -> Node {
        use std::io::BufRead;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = std::process::Command::new(cli_binary())
            .arg("--dir")
            .arg(root)
            .args(["--driver", "centralized_db", "--no-fallback"])
            .args(["--worker-self-reference-url", &format!("http://{addr}")])
            .env("IMAGE_CACHE_DATABASE_URL", database_url)
            .env("IMAGE_CACHE_ADMIN_TOKEN", "admin-token-0123456789abcdef")
            .env("IMAGE_CACHE_PEER_TOKEN", PEER_TOKEN)
            .args(["serve", "--listen", &addr, "--public-downloads"])
            .args(["--upstream-timeout", "5s", "--upstream"])
            .arg(upstream)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            if line.unwrap().starts_with("image-cache serve: listening on") {
                return Node {
                    process: Running(child),
                    addr,
                };
            }
        }
        panic!("the node did not start: {:?}", child.wait());
    }

    /// SIGKILL, as a node dies.
    fn kill(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    fn metric(&self, name: &str) -> u64 {
        let (_, body, _, _) = http_get(&self.addr, "/metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    fn wait_metric(&self, name: &str, want: u64) {
        let until = Instant::now() + Duration::from_secs(30);
        while self.metric(name) < want {
            assert!(Instant::now() < until, "{name} stayed under {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn download(&self, id: &str) -> Vec<u8> {
        let (status, body, complete, head) = http_get(&self.addr, &format!("/v2/images/{id}/file"));
        assert_eq!(status, 200, "{head}");
        assert!(complete, "{head}");
        body
    }
}

/// A plain HTTP/1.1 server on loopback answering each connection once with
/// `respond(path)`: the status, more header lines, the body. Its URL.
fn http_server(
    respond: impl Fn(&str) -> (&'static str, String, Vec<u8>) + Send + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut head = [0u8; 4096];
            let n = c.read(&mut head).unwrap_or(0);
            let head = String::from_utf8_lossy(&head[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, headers, body) = respond(path);
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(&body);
        }
    });
    url
}

fn md5_hex(bytes: &[u8]) -> String {
    let mut h = Hasher::new(Algorithm::Md5);
    h.update(bytes);
    h.finish()
}

/// Three nodes: a miss on B is read from A, which holds the image (one
/// upstream fetch in the fleet); a sibling's request for an image a node
/// does not hold is 404, never a fetch from its upstream.
#[test]
fn a_miss_is_filled_from_the_sibling_that_holds_the_image() {
    let (_shared, cluster) = pg::postgres();
    let db = cluster.database();
    let upstream = tempfile::tempdir().unwrap();
    let bytes = image_bytes(21, (8 << 20) + 5);
    std::fs::write(upstream.path().join("img"), &bytes).unwrap();
    let roots: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Node> = roots
        .iter()
        .map(|r| Node::start(&r.path().join("cache"), upstream.path(), &db.url))
        .collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    assert!(a.download("img") == bytes);
    a.wait_metric("image_cache_images_cached_total", 1);
    assert!(b.download("img") == bytes, "B served the image whole");
    b.wait_metric("image_cache_images_cached_total", 1);
    assert_eq!(b.metric("image_cache_sibling_fills_total"), 1);
    assert_eq!(
        b.metric("image_cache_sibling_bytes_total"),
        bytes.len() as u64
    );
    assert_eq!(a.metric("image_cache_peer_requests_total"), 1);
    let fetched: u64 = nodes
        .iter()
        .map(|n| n.metric("image_cache_upstream_fetches_total"))
        .sum();
    assert_eq!(fetched, 1, "one upstream fetch in the fleet");
    // B holds it now, with A's checksum: C can read it from either.
    assert!(c.download("img") == bytes);
    assert_eq!(c.metric("image_cache_upstream_fetches_total"), 0);

    // A sibling's request is answered from the cache only.
    std::fs::write(upstream.path().join("other"), b"other bytes").unwrap();
    let (status, _, _, head) = http_get_with(
        &c.addr,
        "/v2/images/other/file",
        &format!("X-Image-Cache-Peer-Token: {PEER_TOKEN}\r\n"),
    );
    assert_eq!(status, 404, "{head}");
    assert_eq!(c.metric("image_cache_upstream_fetches_total"), 0);
}

/// A sibling that dies mid-stream (here a test server that sends half the
/// image and closes, as a killed node's socket does): the node goes on
/// from the upstream at the byte reached (`Range`), fetching only the
/// rest, and the checksum covers both parts.
#[test]
fn a_sibling_that_fails_mid_stream_is_resumed_from_the_upstream() {
    let (_shared, cluster) = pg::postgres();
    let db = cluster.database();
    let upstream = tempfile::tempdir().unwrap();
    let bytes = image_bytes(22, (6 << 20) + 3);
    std::fs::write(upstream.path().join("img2"), &bytes).unwrap();
    let half = bytes.len() / 2;

    // The dying sibling, registered as holding the image.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = format!("http://{}", listener.local_addr().unwrap());
    let (size, md5) = (bytes.len(), md5_hex(&bytes));
    let first_half = bytes[..half].to_vec();
    let md5_sent = md5.clone();
    let server = std::thread::spawn(move || {
        let md5 = md5_sent;
        let (mut s, _) = listener.accept().unwrap();
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head).unwrap();
        assert!(
            String::from_utf8_lossy(&head)
                .to_ascii_lowercase()
                .contains(&format!("x-image-cache-peer-token: {PEER_TOKEN}")),
            "the node sends the peer token"
        );
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-MD5: {md5}\r\n\r\n"
        )
        .unwrap();
        s.write_all(&first_half).unwrap();
        // Dropped: the connection closes mid-image.
    });
    db.sql(&format!(
        "INSERT INTO node_reference (node_reference_url) VALUES ('{fake}');
         INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id)
           SELECT 'img2', now(), now(), {size}, 0, '{md5}', node_reference_id
           FROM node_reference WHERE node_reference_url = '{fake}';"
    ));

    let root = tempfile::tempdir().unwrap();
    let b = Node::start(&root.path().join("cache"), upstream.path(), &db.url);
    assert!(b.download("img2") == bytes, "served whole and right");
    server.join().unwrap();
    b.wait_metric("image_cache_images_cached_total", 1);
    assert_eq!(b.metric("image_cache_sibling_failures_total"), 1);
    assert_eq!(b.metric("image_cache_upstream_resumes_total"), 1);
    let from_sibling = b.metric("image_cache_sibling_bytes_total");
    assert!(
        from_sibling > 0 && from_sibling <= half as u64,
        "{from_sibling}"
    );
    assert_eq!(
        b.metric("image_cache_upstream_bytes_total"),
        bytes.len() as u64 - from_sibling,
        "only the rest came from the upstream"
    );
    // What B cached is the image.
    assert!(b.download("img2") == bytes);
}

/// `image-cache warm` fans a list out to three nodes through one of them
/// (concurrency 2 on each), with progress and a final report; `--top`
/// picks the most-hit images across the nodes; an image the upstream does
/// not have fails the run (exit 1) and is named in the report.
#[test]
fn warming_fans_out_and_reports() {
    let (_shared, cluster) = pg::postgres();
    let db = cluster.database();
    let upstream = tempfile::tempdir().unwrap();
    let images: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("w{i}"), image_bytes(30 + i as u8, (1 << 20) + i)))
        .collect();
    for (id, bytes) in &images {
        std::fs::write(upstream.path().join(id), bytes).unwrap();
    }
    let roots: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Node> = roots
        .iter()
        .map(|r| Node::start(&r.path().join("cache"), upstream.path(), &db.url))
        .collect();
    let warm = |args: &[&str]| {
        std::process::Command::new(cli_binary())
            .arg("warm")
            .args(["--server", &format!("http://{}", nodes[0].addr)])
            .args(args)
            .env("IMAGE_CACHE_ADMIN_TOKEN", "admin-token-0123456789abcdef")
            .output()
            .unwrap()
    };
    let node_args: Vec<String> = nodes
        .iter()
        .flat_map(|n| ["--node".to_string(), format!("http://{}", n.addr)])
        .collect();
    let mut args: Vec<&str> = vec!["--json", "--concurrency", "2"];
    args.extend(node_args.iter().map(String::as_str));
    args.extend(images.iter().map(|(id, _)| id.as_str()));
    let out = warm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["images"], 18, "{report}");
    assert_eq!(report["done"], 18, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(
        report["cached"].as_u64().unwrap() + report["already_cached"].as_u64().unwrap(),
        18,
        "{report}"
    );
    assert_eq!(report["nodes"].as_array().unwrap().len(), 2, "{report}");
    for node in &nodes {
        for (id, bytes) in &images {
            let (status, body, _, head) = http_get_with(
                &node.addr,
                &format!("/v2/images/{id}/file"),
                &format!("X-Image-Cache-Peer-Token: {PEER_TOKEN}\r\n"),
            );
            assert_eq!(status, 200, "{id} on {}: {head}", node.addr);
            assert!(body == *bytes);
        }
    }
    assert!(nodes[1].metric("image_cache_warm_images_total") >= 6);

    // --top: the most-hit across two nodes, warmed on another. The hits
    // are made on a node of their own: the first nodes' counts depend on
    // which of them the warming above read from as a sibling.
    let roots2: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let fresh: Vec<Node> = roots2
        .iter()
        .map(|r| Node::start(&r.path().join("cache"), upstream.path(), &db.url))
        .collect();
    for id in ["w0", "w1", "w2"] {
        fresh[0].download(id);
    }
    fresh[0].wait_metric("image_cache_images_cached_total", 3);
    for (id, times) in [("w0", 3), ("w1", 2), ("w2", 1)] {
        for _ in 0..times {
            fresh[0].download(id);
        }
    }
    // Counted (the server counts a hit after its last byte is sent, which
    // may be after the client has read it); the listing flushes them.
    fresh[0].wait_metric("image_cache_hits_total", 6);
    let out = std::process::Command::new(cli_binary())
        .arg("warm")
        .args(["--server", &format!("http://{}", fresh[0].addr)])
        .args(["--json", "--top", "2", "--days", "1"])
        .args(["--node", &format!("http://{}", fresh[0].addr)])
        .args(["--node", &format!("http://{}", fresh[1].addr)])
        .env("IMAGE_CACHE_ADMIN_TOKEN", "admin-token-0123456789abcdef")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["images"], 4, "{report}");
    assert_eq!(report["already_cached"], 2, "{report}");
    assert_eq!(report["cached"], 2, "{report}");
    for id in ["w0", "w1"] {
        let (status, _, _, _) = http_get_with(
            &fresh[1].addr,
            &format!("/v2/images/{id}/file"),
            &format!("X-Image-Cache-Peer-Token: {PEER_TOKEN}\r\n"),
        );
        assert_eq!(status, 200, "{id} warmed on the fresh node");
    }
    let (status, _, _, _) = http_get_with(
        &fresh[1].addr,
        "/v2/images/w2/file",
        &format!("X-Image-Cache-Peer-Token: {PEER_TOKEN}\r\n"),
    );
    assert_eq!(status, 404, "w2 was not among the top 2");

    // An image the upstream does not have: named, exit 1.
    let out = warm(&["w0", "missing"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("missing:"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 of 2 images could not be warmed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing named: a usage error.
    assert_eq!(warm(&[]).status.code(), Some(2));
}

/// A real node killed mid-stream: B is reading a 256 MiB image from A when
/// A gets SIGKILL; B goes on from the upstream at the byte it reached and
/// serves its client the whole image. (If B happens to finish before the
/// kill lands, the run is repeated with another image, at most 3 times.)
#[test]
fn a_sibling_killed_mid_stream_is_resumed_from_the_upstream() {
    let (_shared, cluster) = pg::postgres();
    let db = cluster.database();
    let upstream = tempfile::tempdir().unwrap();
    let size = 256 << 20;
    for attempt in 0..3 {
        let id = format!("killed-{attempt}");
        let bytes = image_bytes(40 + attempt as u8, size);
        std::fs::write(upstream.path().join(&id), &bytes).unwrap();
        let (ra, rb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = Node::start(&ra.path().join("cache"), upstream.path(), &db.url);
        assert!(a.download(&id) == bytes);
        a.wait_metric("image_cache_images_cached_total", 1);
        let b = Node::start(&rb.path().join("cache"), upstream.path(), &db.url);
        let reader = {
            let (addr, id) = (b.addr.clone(), id.clone());
            std::thread::spawn(move || http_get(&addr, &format!("/v2/images/{id}/file")))
        };
        let until = Instant::now() + Duration::from_secs(60);
        while b.metric("image_cache_sibling_bytes_total") == 0 {
            assert!(Instant::now() < until, "B never read from A");
            std::thread::sleep(Duration::from_millis(1));
        }
        a.kill();
        let (status, body, complete, head) = reader.join().unwrap();
        assert_eq!(status, 200, "{head}");
        assert!(complete && body == bytes, "B's client got the whole image");
        if b.metric("image_cache_sibling_failures_total") == 0 {
            eprintln!("attempt {attempt}: B had the image before A was killed; again");
            continue;
        }
        b.wait_metric("image_cache_images_cached_total", 1);
        assert_eq!(b.metric("image_cache_upstream_resumes_total"), 1);
        let from_a = b.metric("image_cache_sibling_bytes_total");
        assert!(from_a > 0 && from_a < size as u64, "{from_a}");
        assert_eq!(
            b.metric("image_cache_upstream_bytes_total"),
            size as u64 - from_a,
            "only the rest came from the upstream"
        );
        eprintln!("A killed after {from_a} of {size} bytes; the rest from the upstream");
        return;
    }
    panic!("B finished before A was killed in 3 attempts");
}

/// A node listed in the shared database does not vouch for its own bytes:
/// with a Glance upstream, a sibling's image is checked against Glance's
/// record. A poisoning "sibling" (registered by a writer of the shared
/// tables) that sends other bytes with their own matching Content-MD5 is
/// not used; the fill goes to the upstream and the client gets the image.
#[test]
fn a_poisoning_sibling_is_refused_by_the_upstreams_record() {
    let (_shared, cluster) = pg::postgres();
    let db = cluster.database();
    let image = image_bytes(50, (2 << 20) + 9);
    let poison = image_bytes(51, image.len());
    // A Glance-like upstream: the record (size, checksum) and the file.
    let (image2, md5) = (image.clone(), md5_hex(&image));
    let glance_url = http_server(move |path| {
        if path == "/v2/images/img3" {
            let record = serde_json::json!({"id": "img3", "status": "active",
                "size": image2.len(), "checksum": md5});
            (
                "200 OK",
                "Content-Type: application/json\r\n".into(),
                record.to_string().into_bytes(),
            )
        } else if path == "/v2/images/img3/file" {
            (
                "200 OK",
                "Content-Type: application/octet-stream\r\n".into(),
                image2.clone(),
            )
        } else {
            (
                "404 Not Found",
                "Content-Type: text/plain\r\n".into(),
                Vec::new(),
            )
        }
    });
    // The poisoning sibling: other bytes, their own MD5.
    let (poison2, poison_md5) = (poison.clone(), md5_hex(&poison));
    let liar_url = http_server(move |_| {
        (
            "200 OK",
            format!("Content-MD5: {poison_md5}\r\n"),
            poison2.clone(),
        )
    });
    db.sql(&format!(
        "INSERT INTO node_reference (node_reference_url) VALUES ('{liar_url}');
         INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id)
           SELECT 'img3', now(), now(), {}, 0, '{}', node_reference_id
           FROM node_reference WHERE node_reference_url = '{liar_url}';",
        poison.len(),
        md5_hex(&poison)
    ));
    let root = tempfile::tempdir().unwrap();
    let b = Node::start_with_upstream(&root.path().join("cache"), &glance_url, &db.url);
    assert!(b.download("img3") == image, "the image, not the poison");
    b.wait_metric("image_cache_images_cached_total", 1);
    assert_eq!(b.metric("image_cache_sibling_fills_total"), 0);
    assert_eq!(b.metric("image_cache_upstream_fetches_total"), 1);
    assert!(b.download("img3") == image, "the cache holds the image");
}
