//! The `image-cache` command-line tool, driven as an operator would: the
//! real binary on temporary cache roots, checking output, `--json`
//! documents and exit codes (0 success, 1 operational error, 2 usage).
//!
//! The binary is `<target>/<profile>/image-cache`; the first test builds it
//! with `cargo build -p image-cache-cli --bin image-cache` (a no-op when it is
//! up to date), unless `IMAGE_CACHE_BIN` names one to use instead.
//! Compiled driver components are kept in `<target>/tmp/xdg` so only the
//! first run compiles them.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tempfile::TempDir;

fn bin() -> &'static Path {
    image_cache_tests::cli_binary()
}

/// Where compiled driver components are shared by every test run.
fn xdg_cache_home() -> PathBuf {
    image_cache_tests::profile_dir()
        .parent()
        .expect("target directory")
        .join("tmp")
        .join("xdg")
}

/// A temporary work directory with a cache root `cache/` in it.
struct Sandbox {
    dir: TempDir,
}

/// What one run of the tool did.
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.out(),
                self.stderr
            )
        })
    }

    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(
            self.code,
            0,
            "expected success\nstdout: {}\nstderr: {}",
            self.out(),
            self.stderr
        );
        self
    }

    /// Expect exit `code` and one `image-cache: error:` line containing
    /// `needle` on stderr.
    #[track_caller]
    fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(
            self.code,
            code,
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.out(),
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "{}", self.stderr);
        self
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn root(&self) -> PathBuf {
        self.path("cache")
    }

    /// The tool with a clean environment, run in the sandbox.
    fn bare(&self) -> Command {
        let mut cmd = Command::new(bin());
        cmd.current_dir(self.dir.path())
            .env("XDG_CACHE_HOME", xdg_cache_home())
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .env_remove("IMAGE_CACHE_DIR")
            .env_remove("IMAGE_CACHE_DRIVER")
            .env_remove("IMAGE_CACHE_CONFIG")
            .env_remove("IMAGE_CACHE_SQLITE_DB")
            .env_remove("IMAGE_CACHE_DRIVER_TRUST")
            .env_remove("IMAGE_CACHE_DRIVER_STORE")
            .stdin(Stdio::null());
        cmd
    }

    /// The tool on this sandbox's cache root.
    fn cmd(&self) -> Command {
        let mut cmd = self.bare();
        cmd.arg("--dir").arg(self.root());
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        run(self.cmd().args(args))
    }

    fn run_with_input(&self, args: &[&str], input: &[u8]) -> Run {
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn image-cache");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let output = child.wait_with_output().expect("wait for image-cache");
        writer.join().unwrap();
        to_run(output)
    }

    /// Write a source file and return its path.
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Cache `bytes` as image `id` from a file.
    fn put(&self, id: &str, bytes: &[u8]) {
        let src = self.file(&format!("src-{id}"), bytes);
        self.run(&["cache", id, "--from", src.to_str().unwrap()])
            .ok();
    }

    fn status(&self, id: &str) -> Value {
        self.run(&["--json", "status", id]).ok().json()
    }

    fn cached_ids(&self) -> Vec<String> {
        let doc = self.run(&["--json", "list-cached"]).ok().json();
        doc["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["image_id"].as_str().unwrap().to_string())
            .collect()
    }

    fn queued_ids(&self) -> Vec<String> {
        let doc = self.run(&["--json", "list-queued"]).ok().json();
        doc["queued"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect()
    }
}

fn to_run(output: Output) -> Run {
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn run(cmd: &mut Command) -> Run {
    to_run(cmd.output().expect("run image-cache"))
}

/// Digests of b"hello\n".
const HELLO_MD5: &str = "b1946ac92492d2347c6235b4d2611184";
const HELLO_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

#[test]
fn help_for_every_command() {
    let s = Sandbox::new();
    let top = run(s.bare().arg("--help")).ok();
    let commands = [
        "list-cached",
        "list-queued",
        "queue",
        "delete-queued",
        "delete-all-queued",
        "cache",
        "read",
        "delete-cached",
        "delete-all-cached",
        "prune",
        "clean",
        "prefetch",
        "status",
        "size",
        "drivers",
        "serve",
    ];
    for command in commands {
        assert!(top.out().contains(command), "--help lacks {command}");
        let help = run(s.bare().args([command, "--help"])).ok();
        assert!(
            help.out().contains("Usage: image-cache"),
            "{command}: {}",
            help.out()
        );
        let first = help.out().lines().next().unwrap_or_default().to_string();
        assert!(first.len() > 10, "{command} has no description: {first:?}");
    }
    run(s.bare().arg("--version")).ok();
}

#[test]
fn usage_errors_exit_2() {
    let s = Sandbox::new();
    // No directory anywhere: the message says how to give one.
    let r = run(s.bare().arg("list-cached")).fails(2, "image-cache: error: no cache directory");
    assert!(r.stderr.contains("--dir") && r.stderr.contains("IMAGE_CACHE_DIR"));
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // clap's own usage errors.
    assert_eq!(s.run(&["no-such-command"]).code, 2);
    assert_eq!(s.run(&["cache", "x"]).code, 2); // --from missing
    s.run(&["prune", "--max-size", "ten"])
        .fails(2, "is not a size");
    s.run(&["prune", "--max-size", "10X"])
        .fails(2, "unknown size unit");
    s.run(&["clean", "--stall-time", "1x"])
        .fails(2, "is not a duration");
    let src = s.file("img", b"x");
    s.run(&[
        "cache",
        "x",
        "--from",
        src.to_str().unwrap(),
        "--checksum",
        "sha1:abc",
    ])
    .fails(2, "unknown checksum algorithm");
    s.run(&[
        "cache",
        "x",
        "--from",
        src.to_str().unwrap(),
        "--checksum",
        "md5:abc",
    ])
    .fails(2, "32 hex digits");
    // A bare word that is no built-in driver is a typo, not a file.
    s.run(&["--driver", "sqllite", "size"])
        .fails(2, "unknown driver \"sqllite\"");
    assert!(s.cached_ids().is_empty());
}

#[test]
fn cache_list_read_and_status() {
    let s = Sandbox::new();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let src = s.file("big.img", &big);
    let r = s
        .run(&["cache", "big", "--from", src.to_str().unwrap()])
        .ok();
    assert!(r.out().contains("cached image \"big\""), "{}", r.out());
    assert!(r.out().contains("3000000 bytes"), "{}", r.out());

    // From stdin, with a checksum, in JSON.
    let r = s
        .run_with_input(
            &[
                "--json",
                "cache",
                "small",
                "--from",
                "-",
                "--checksum",
                &format!("sha256:{HELLO_SHA256}"),
            ],
            b"hello\n",
        )
        .ok();
    let doc = r.json();
    assert_eq!(doc["image_id"], "small");
    assert_eq!(doc["bytes"], 6);
    assert_eq!(doc["checksum"], format!("sha256:{HELLO_SHA256}"));
    // And an md5 checksum from a file.
    let hello = s.file("hello", b"hello\n");
    s.run(&[
        "cache",
        "md5",
        "--from",
        hello.to_str().unwrap(),
        "--checksum",
        &format!("md5:{HELLO_MD5}"),
    ])
    .ok();

    // The table: ids, human sizes, the total.
    let table = s.run(&["list-cached"]).ok().out();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LAST ACCESSED"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("big ") && lines[1].contains("2.9 MiB"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("md5 ") && lines[3].starts_with("small "),
        "{table}"
    );
    assert_eq!(
        lines[4], "total: 3 images, 2.9 MiB (3000012 bytes)",
        "{table}"
    );

    // Reading counts a hit and gives the bytes back.
    let r = s.run(&["read", "big"]).ok();
    assert!(r.stdout == big, "read gave other bytes");
    let out = s.path("out/copy.img");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let r = s.run(&["read", "big", "--to", out.to_str().unwrap()]).ok();
    assert!(r.out().contains("wrote image \"big\""), "{}", r.out());
    assert!(fs::read(&out).unwrap() == big);
    assert_eq!(
        fs::read_dir(out.parent().unwrap()).unwrap().count(),
        1,
        "a temp file was left"
    );

    // JSON records: raw numbers, ISO 8601 UTC and the raw float seconds.
    let doc = s.run(&["--json", "list-cached"]).ok().json();
    assert_eq!(doc["count"], 3);
    assert_eq!(doc["total_size"], 3_000_012);
    let images = doc["images"].as_array().unwrap();
    let ids: Vec<&str> = images
        .iter()
        .map(|i| i["image_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["big", "md5", "small"]);
    let rec = &images[0];
    assert_eq!(rec["size"], 3_000_000);
    assert_eq!(rec["hits"], 2);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for field in ["last_accessed", "last_modified"] {
        let unix = rec[format!("{field}_unix")].as_f64().unwrap();
        assert!((now - unix).abs() < 600.0, "{field}: {unix} vs {now}");
        let iso = rec[field].as_str().unwrap();
        assert_eq!(iso.len(), 20, "{iso}");
        assert!(iso.ends_with('Z') && iso.as_bytes()[10] == b'T', "{iso}");
    }

    // Status of each state.
    let st = s.status("big");
    assert_eq!(st["state"], "cached");
    assert_eq!(st["size"], 3_000_000);
    assert_eq!(st["hits"], 2);
    let text = s.run(&["status", "big"]).ok().out();
    assert!(
        text.contains("is cached") && text.contains("2 hits"),
        "{text}"
    );
    let st = s.status("nope");
    assert_eq!(st["state"], "absent");
    assert_eq!(st["size"], Value::Null);
    let text = s.run(&["status", "nope"]).ok().out();
    assert!(text.contains("image \"nope\" is not cached"), "{text}");
    s.run(&["queue", "later"]).ok();
    assert_eq!(s.status("later")["state"], "queued");
    fs::write(s.root().join("incomplete").join("writing"), b"part").unwrap();
    assert_eq!(s.status("writing")["state"], "being-cached");

    // Size.
    let r = s.run(&["size"]).ok();
    assert!(r.out().contains("(3000012 bytes)"), "{}", r.out());
    let doc = s.run(&["--json", "size"]).ok().json();
    assert_eq!(doc["bytes"], 3_000_012);
    assert_eq!(doc["human"], "2.9 MiB");
    assert_eq!(doc["max_size"], 10u64 << 30);
}

#[test]
fn caching_failures_cache_nothing() {
    let s = Sandbox::new();
    let src = s.file("hello", b"hello\n");
    let src = src.to_str().unwrap();
    let wrong = "md5:00000000000000000000000000000000";
    s.run(&["cache", "bad", "--from", src, "--checksum", wrong])
        .fails(1, "checksum mismatch for image \"bad\"");
    s.run_with_input(
        &["cache", "bad", "--from", "-", "--checksum", wrong],
        b"hello\n",
    )
    .fails(1, "nothing was cached");
    assert_eq!(s.status("bad")["state"], "absent");
    assert!(s.cached_ids().is_empty());
    // A missing source names the file; a directory is no image.
    s.run(&["cache", "x", "--from", "no-such-file"])
        .fails(1, "no-such-file");
    s.run(&["cache", "x", "--from", "."])
        .fails(1, "is a directory");
    assert!(s.cached_ids().is_empty());
    // Already cached: an error, the first copy kept.
    s.run(&["cache", "ok", "--from", src]).ok();
    s.run(&["cache", "ok", "--from", src])
        .fails(1, "image \"ok\" is already cached");
    assert_eq!(s.cached_ids(), ["ok"]);
    // The aborted write is left in invalid/ for clean to remove.
    let doc = s.run(&["--json", "clean"]).ok().json();
    assert_eq!(doc["invalid_removed"], 1);
}

#[test]
fn invalid_ids_touch_nothing() {
    let s = Sandbox::new();
    s.put("a", b"aaa");
    let src = s.file("x", b"x");
    let src = src.to_str().unwrap();
    for id in ["../x", "", ".", "a/b", "a\\b"] {
        s.run(&["status", id]).fails(1, "invalid image id");
        s.run(&["delete-cached", id]).fails(1, "invalid image id");
        s.run(&["cache", id, "--from", src])
            .fails(1, "invalid image id");
        s.run(&["read", id]).fails(1, "invalid image id");
        s.run(&["queue", id]).fails(1, "invalid image id");
        s.run(&["delete-queued", id]).fails(1, "invalid image id");
    }
    assert_eq!(s.cached_ids(), ["a"]);
    assert!(s.queued_ids().is_empty());
    // With --json the error is also a document on stdout.
    let r = s
        .run(&["--json", "status", "../x"])
        .fails(1, "invalid image id");
    assert_eq!(r.json()["error"]["kind"], "invalid-image-id");
}

#[test]
fn deleting_cached_images() {
    let s = Sandbox::new();
    s.put("a", b"aaa");
    s.put("b", b"bbbb");
    // A typo deletes nothing.
    s.run(&["delete-cached", "c"])
        .fails(3, "image \"c\" is not cached");
    assert_eq!(s.cached_ids(), ["a", "b"]);
    let r = s.run(&["delete-cached", "a"]).ok();
    assert!(
        r.out().contains("deleted cached image \"a\""),
        "{}",
        r.out()
    );
    assert_eq!(s.cached_ids(), ["b"]);
    assert!(!s.root().join("a").exists());

    // Without a terminal, delete-all-cached needs --force.
    s.run(&["delete-all-cached"]).fails(2, "--force");
    assert_eq!(s.cached_ids(), ["b"]);
    let doc = s
        .run(&["--json", "delete-all-cached", "--force"])
        .ok()
        .json();
    assert_eq!(doc["deleted"], 1);
    assert!(s.cached_ids().is_empty());
    let r = s.run(&["delete-all-cached", "--force"]).ok();
    assert!(r.out().contains("deleted 0 cached images"), "{}", r.out());
}

#[test]
fn the_queue() {
    let s = Sandbox::new();
    s.put("cached", b"c");
    let r = s.run(&["queue", "q1", "q2", "cached", "q1"]).ok();
    let out = r.out();
    assert!(out.contains("queued image \"q1\""), "{out}");
    assert!(
        out.contains("image \"cached\" not queued: already cached"),
        "{out}"
    );
    assert!(
        out.contains("image \"q1\" not queued: already queued"),
        "{out}"
    );
    assert_eq!(s.queued_ids(), ["q1", "q2"]);
    let text = s.run(&["list-queued"]).ok().out();
    assert!(text.starts_with("q1\nq2\n"), "{text}");

    // A mix of good and invalid ids: the good ones are queued, exit 1.
    let r = s
        .run(&["--json", "queue", "q3", "bad/id"])
        .fails(1, "1 of 2 images could not be queued");
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results[0]["queued"], true);
    assert!(
        results[1]["error"]
            .as_str()
            .unwrap()
            .contains("invalid image id")
    );

    s.run(&["delete-queued", "nope"])
        .fails(3, "image \"nope\" is not queued");
    s.run(&["delete-queued", "q2"]).ok();
    assert_eq!(s.queued_ids(), ["q1", "q3"]);
    let doc = s.run(&["--json", "delete-all-queued"]).ok().json();
    assert_eq!(doc["deleted"], 2);
    assert!(s.queued_ids().is_empty());
    assert_eq!(s.run(&["list-queued"]).ok().out(), "no images queued\n");
}

#[test]
fn prefetch_caches_what_it_finds() {
    let s = Sandbox::new();
    s.run(&["queue", "good", "missing"]).ok();
    let store = s.path("store");
    s.file("store/good", b"good image bytes");
    let r = s
        .run(&["prefetch", "--source", store.to_str().unwrap()])
        .fails(1, "1 of 2 queued images could not be prefetched");
    let out = r.out();
    assert!(out.contains("cached") && out.contains("good"), "{out}");
    assert!(out.contains("failed") && out.contains("missing"), "{out}");
    assert_eq!(s.cached_ids(), ["good"]);
    assert_eq!(s.queued_ids(), ["missing"]);
    let r = s.run(&["read", "good"]).ok();
    assert_eq!(r.stdout, b"good image bytes");

    // Once the image appears, the next run caches it.
    s.file("store/missing", b"late");
    let doc = s
        .run(&["--json", "prefetch", "--source", store.to_str().unwrap()])
        .ok()
        .json();
    assert_eq!(doc["cached"], 1);
    assert_eq!(doc["failed"], 0);
    assert_eq!(doc["results"][0]["status"], "cached");
    assert!(s.queued_ids().is_empty());
    let r = s
        .run(&["prefetch", "--source", store.to_str().unwrap()])
        .ok();
    assert!(r.out().contains("no images queued"), "{}", r.out());

    s.run(&["prefetch", "--source", "no-such-dir"])
        .fails(1, "no-such-dir");
}

#[test]
fn prune_evicts_least_recently_accessed() {
    let s = Sandbox::new();
    for id in ["a", "b", "c"] {
        s.put(id, &[0u8; 1000]);
    }
    // Read a and c: b is now the least recently accessed.
    s.run(&["read", "a"]).ok();
    s.run(&["read", "c"]).ok();
    let r = s.run(&["prune"]).ok();
    assert!(r.out().contains("nothing to prune"), "{}", r.out());
    let r = s.run(&["prune", "--max-size", "2500"]).ok();
    assert!(r.out().contains("evicted b"), "{}", r.out());
    assert!(
        r.out().contains("pruned 1 image, 1000 B (1000 bytes)"),
        "{}",
        r.out()
    );
    assert_eq!(s.cached_ids(), ["a", "c"]);
    // Sizes as operators type them.
    s.run(&["prune", "--max-size", "1K"]).ok();
    assert_eq!(s.cached_ids(), ["c"]);
    s.run(&["prune", "--max-size", "512MiB"]).ok();
    s.run(&["prune", "--max-size", "1048576"]).ok();
    let doc = s.run(&["--json", "prune", "--max-size", "0"]).ok().json();
    assert_eq!(doc["files_removed"], 1);
    assert_eq!(doc["bytes_removed"], 1000);
    assert_eq!(doc["size_after"], 0);
    assert_eq!(doc["removed"][0]["image_id"], "c");
    assert!(s.cached_ids().is_empty());
}

#[test]
fn clean_removes_invalid_and_stalled_files() {
    let s = Sandbox::new();
    s.run(&["size"]).ok(); // creates the layout
    let root = s.root();
    fs::write(root.join("invalid/broken"), b"12345").unwrap();
    let old = root.join("incomplete/old");
    fs::write(&old, b"123").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7_200);
    fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    fs::write(root.join("incomplete/fresh"), b"1").unwrap();

    // The default stall time (1 day) keeps both incomplete files.
    let r = s.run(&["clean"]).ok();
    assert!(
        r.out()
            .contains("cleaned: 1 invalid file and 0 incomplete files (stalled longer than 1d)"),
        "{}",
        r.out()
    );
    assert!(old.exists());
    let doc = s
        .run(&["--json", "clean", "--stall-time", "1h"])
        .ok()
        .json();
    assert_eq!(doc["stall_time"], 3600);
    assert_eq!(doc["invalid_removed"], 0);
    assert_eq!(doc["incomplete_removed"], 1);
    assert_eq!(doc["incomplete"][0]["image_id"], "old");
    assert_eq!(doc["bytes_removed"], 3);
    assert!(!old.exists() && root.join("incomplete/fresh").exists());
    s.run(&["clean", "--stall-time", "3600"]).ok();
    s.run(&["clean", "--stall-time", "1d"]).ok();
    assert!(root.join("incomplete/fresh").exists());
}

#[test]
fn glance_cache_conf_is_honoured() {
    let s = Sandbox::new();
    let conf = s.file(
        "glance-cache.conf",
        format!(
            "# glance-cache.conf\n[DEFAULT]\nimage_cache_dir = {}\nimage_cache_max_size = 1500\n\
             image_cache_stall_time = 1h\nimage_cache_sqlite_db = glance.db\nverbose = True\n\
             [glance_store]\nfilesystem_store_datadirs = /nowhere\n",
            s.root().display()
        )
        .as_bytes(),
    );
    let conf = conf.to_str().unwrap();
    let src = s.file("img", &[7u8; 1000]);
    let src = src.to_str().unwrap();
    for id in ["a", "b"] {
        run(s
            .bare()
            .args(["--config", conf, "cache", id, "--from", src]))
        .ok();
    }
    assert!(
        s.root().join("a").exists(),
        "the config's directory was not used"
    );
    assert!(
        s.root().join("glance.db").exists(),
        "image_cache_sqlite_db was not used"
    );
    let doc = run(s.bare().args(["--config", conf, "--json", "size"]))
        .ok()
        .json();
    assert_eq!(doc["max_size"], 1500);
    // prune with the config's maximum: one of the two 1000-byte images goes.
    let doc = run(s.bare().args(["--config", conf, "--json", "prune"]))
        .ok()
        .json();
    assert_eq!(doc["max_size"], 1500);
    assert_eq!(doc["files_removed"], 1);
    // The environment names the config file too; a flag wins over it.
    let r = run(s
        .bare()
        .env("IMAGE_CACHE_CONFIG", conf)
        .args(["--json", "size"]))
    .ok();
    assert_eq!(r.json()["bytes"], 1000);
    let other = s.path("other");
    let r = run(s
        .bare()
        .env("IMAGE_CACHE_CONFIG", conf)
        .arg("--dir")
        .arg(&other)
        .args(["--json", "size"]))
    .ok();
    assert_eq!(r.json()["bytes"], 0);
    assert!(other.join("queue").is_dir());
    // The environment alone is enough (the database named again, or it
    // would count as an image file).
    let r = run(s
        .bare()
        .env("IMAGE_CACHE_DIR", s.root())
        .env("IMAGE_CACHE_SQLITE_DB", "glance.db")
        .args(["--json", "size"]))
    .ok();
    assert_eq!(r.json()["bytes"], 1000);

    // A bad value names the file and the key; a missing file is named.
    let bad = s.file("bad.conf", b"[DEFAULT]\nimage_cache_max_size = lots\n");
    run(s.bare().args(["--config", bad.to_str().unwrap(), "size"]))
        .fails(2, "image_cache_max_size");
    run(s.bare().args(["--config", "missing.conf", "size"])).fails(2, "missing.conf");
    let empty = s.file("empty.conf", b"[DEFAULT]\n");
    run(s.bare().args(["--config", empty.to_str().unwrap(), "size"]))
        .fails(2, "has no image_cache_dir");
}

#[test]
fn drivers_and_driver_selection() {
    let s = Sandbox::new();
    let text = run(s.bare().arg("drivers")).ok().out();
    assert!(text.contains("sqlite (default):"), "{text}");
    assert!(text.contains("xattr:"), "{text}");
    assert!(!text.contains("image-cache:driver/sqlite@"), "{text}");
    assert!(text.contains("image-cache:driver/xattr@"), "{text}");
    assert!(
        text.contains("contract:      image-cache:driver@0.3.0 (supported)"),
        "{text}"
    );
    assert!(!text.contains("wasi:"), "{text}");
    assert!(text.contains("centralized:"), "{text}");
    assert!(text.contains("image-cache:driver/database@"), "{text}");
    let doc = run(s.bare().args(["--json", "drivers"])).ok().json();
    let drivers = doc["drivers"].as_array().unwrap();
    assert_eq!(drivers.len(), 3);
    assert_eq!(drivers[2]["name"], "centralized");
    assert_eq!(drivers[0]["name"], "sqlite");
    assert_eq!(drivers[0]["driver"]["name"], "sqlite");
    assert_eq!(drivers[0]["imports"].as_array().unwrap().len(), 3);
    assert_eq!(drivers[0]["grants_needed"], serde_json::json!([]));
    assert!(drivers[0]["not_granted"].as_array().unwrap().is_empty());
    assert_eq!(drivers[1]["grants_needed"], serde_json::json!(["xattr"]));
    assert_eq!(
        doc["supported"],
        ">=0.3.0, <0.4.0, and 0.2.0 through an adapter"
    );

    // A driver file that cannot be loaded: fall back with a warning, or
    // fail with --no-fallback.
    let r = s.run(&["--driver", "./missing.wasm", "size"]).ok();
    assert!(
        r.stderr.contains("warning") && r.stderr.contains("falling back"),
        "{}",
        r.stderr
    );
    s.run(&["--driver", "./missing.wasm", "--no-fallback", "size"])
        .fails(1, "cannot load driver ./missing.wasm");
    let r = s.run(&["--driver", "./missing.wasm", "-q", "size"]).ok();
    assert!(r.stderr.is_empty(), "-q shows warnings: {}", r.stderr);
    run(s.bare().args(["--driver", "./missing.wasm", "drivers"])).fails(1, "missing.wasm");

    // The xattr driver, where the temp file system has user xattrs.
    let x = Sandbox::new();
    let r = x.run(&["--driver", "xattr", "--no-fallback", "size"]);
    if r.code == 0 {
        let src = x.file("img", b"xattr bytes");
        x.run(&[
            "--driver",
            "xattr",
            "cache",
            "i",
            "--from",
            src.to_str().unwrap(),
        ])
        .ok();
        x.run(&["--driver", "xattr", "read", "i"]).ok();
        let st = x
            .run(&["--driver", "xattr", "--json", "status", "i"])
            .ok()
            .json();
        assert_eq!(st["hits"], 1);
        assert!(!x.root().join("cache.db").exists());
    } else {
        r.fails(1, "bad configuration");
    }
}

#[test]
fn read_failures_leave_no_partial_file() {
    let s = Sandbox::new();
    s.put("a", b"aaa");
    let out = s.path("out.img");
    s.run(&["read", "nope", "--to", out.to_str().unwrap()])
        .fails(3, "image \"nope\" is not cached");
    assert!(!out.exists());
    s.run(&["read", "a", "--to", "no-such-dir/out.img"])
        .fails(1, "no-such-dir/out.img");
    s.run(&["read", "a", "--to", "."])
        .fails(1, "is a directory");
    let leftovers: Vec<_> = fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // None of that counted a hit.
    assert_eq!(s.status("a")["hits"], 0);
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let s = Sandbox::new();
    let big = vec![b'x'; 4 << 20];
    let src = s.file("big", &big);
    s.run(&["cache", "big", "--from", src.to_str().unwrap()])
        .ok();
    // Enough queue markers (the layout of docs/src/spec.md) that their listing overflows
    // a pipe's buffer.
    for i in 0..5_000 {
        fs::write(s.root().join(format!("queue/queued-image-{i:05}")), b"").unwrap();
    }
    assert_eq!(s.queued_ids().len(), 5_000);
    for args in [
        &["read", "big"][..],
        &["list-queued"][..],
        &["--json", "list-queued"][..],
    ] {
        let mut child = s
            .cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut one = [0u8; 1];
        stdout.read_exact(&mut one).unwrap();
        drop(stdout); // `| head -c1`
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    // The read cut short counted no hit.
    assert_eq!(s.status("big")["hits"], 0);
}

#[test]
fn sqlite_db_name_and_verbosity() {
    let s = Sandbox::new();
    s.run(&["--sqlite-db", "other.db", "size"]).ok();
    assert!(s.root().join("other.db").exists());
    assert!(!s.root().join("cache.db").exists());
    let r = run(s
        .cmd()
        .env("IMAGE_CACHE_SQLITE_DB", "env.db")
        .args(["-v", "size"]))
    .ok();
    assert!(s.root().join("env.db").exists());
    assert!(r.stderr.contains("image-cache: info:"), "{}", r.stderr);
    let r = s.run(&["size"]).ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
}

/// `drivers inspect`, pinning and grants, as an operator uses them.
#[test]
fn inspect_pin_and_grant_a_third_party_driver() {
    let s = Sandbox::new();
    let path = s.file("third-party.wasm", image_cache::builtin::XATTR.component);
    let path = path.to_str().unwrap();
    let sha = image_cache::runtime::sha256_hex(image_cache::builtin::XATTR.component);

    let text = run(s.bare().args(["drivers", "inspect", path])).ok().out();
    for expected in [
        "driver:        xattr ",
        "contract:      image-cache:driver@0.3.0 (supported)",
        &format!("sha256:        {sha}"),
        "grants needed: fs, clock, xattr",
        "not granted:   xattr",
        "image-cache:driver/xattr@0.3.0",
    ] {
        assert!(text.contains(expected), "{expected:?} in {text}");
    }
    let doc = run(s.bare().args([
        "--json",
        "--driver-grants",
        "xattr",
        "drivers",
        "inspect",
        path,
    ]))
    .ok()
    .json();
    assert_eq!(doc["sha256"], sha);
    assert!(doc["not_granted"].as_array().unwrap().is_empty());

    // Earlier releases' components: inspected, marked as what this host
    // makes of them, with what the driver's author must change.
    for (version, support, refusal) in [
        ("0.1.0", "NOT supported by this host", ">=0.3.0, <0.4.0"),
        (
            "0.2.0",
            "supported through the adapter of an earlier contract",
            "image-cache:driver/sqlite@0.2.0, which contract 0.3.0 retired",
        ),
    ] {
        let old = image_cache_tests::release(version, "sqlite_driver");
        let text = run(s.bare().args(["drivers", "inspect", old.to_str().unwrap()]))
            .ok()
            .out();
        assert!(
            text.contains(&format!("image-cache:driver@{version} ({support})")),
            "{text}"
        );
        assert!(
            text.contains("refused:") && text.contains(refusal),
            "{text}"
        );
    }

    // Not granted: refused at load, naming the interface.
    s.run(&["--driver", path, "--no-fallback", "size"]).fails(
        1,
        "image-cache:driver/xattr@0.3.0, which it was not granted",
    );
    // Granted, but the wrong pin: refused before compiling.
    s.run(&[
        "--driver",
        path,
        "--driver-grants",
        "xattr",
        "--driver-sha256",
        &"ab".repeat(32),
        "--no-fallback",
        "size",
    ])
    .fails(1, "not the pinned");
    // A pin that is not a SHA-256 is a usage error.
    s.run(&["--driver", path, "--driver-sha256", "xyz", "size"])
        .fails(2, "64 hex digits");
    // An unknown capability is a usage error.
    s.run(&["--driver", path, "--driver-grants", "network", "size"])
        .fails(2, "unknown capability \"network\"");
    // Granted and pinned (any case): it runs.
    let r = s
        .run(&[
            "--driver",
            path,
            "--driver-grants",
            "xattr",
            "--driver-sha256",
            &sha.to_uppercase(),
            "--no-fallback",
            "--json",
            "size",
        ])
        .ok();
    assert_eq!(r.json()["bytes"], 0);
}

/// `drivers keygen`, `sign` and `verify`, and the trust setting
/// (`--driver-trust`, `IMAGE_CACHE_DRIVER_TRUST`,
/// `image_cache_driver_trusted_keys`) on a signed and an unsigned copy of
/// a built-in component, as an operator uses them.
#[test]
fn sign_verify_and_trust_a_driver() {
    use std::os::unix::fs::PermissionsExt;
    let s = Sandbox::new();
    let doc = run(s.bare().args([
        "--json",
        "drivers",
        "keygen",
        "--secret-key",
        "ours.sec",
        "--public-key",
        "ours.pub",
    ]))
    .ok()
    .json();
    let ours = doc["key_id"].as_str().unwrap().to_string();
    assert_eq!(ours.len(), 24, "{doc}");
    let mode = fs::metadata(s.path("ours.sec"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret key is its owner's alone");
    let text = run(s.bare().args([
        "drivers",
        "keygen",
        "--secret-key",
        "theirs.sec",
        "--public-key",
        "theirs.pub",
    ]))
    .ok()
    .out();
    let theirs = text
        .strip_prefix("key id ")
        .and_then(|t| t.lines().next())
        .unwrap()
        .to_string();
    let before = fs::read(s.path("ours.sec")).unwrap();
    run(s.bare().args([
        "drivers",
        "keygen",
        "--secret-key",
        "ours.sec",
        "--public-key",
        "new.pub",
    ]))
    .fails(1, "already exists");
    assert_eq!(
        fs::read(s.path("ours.sec")).unwrap(),
        before,
        "never overwritten"
    );
    assert!(!s.path("new.pub").exists());

    let component = image_cache::builtin::SQLITE.component;
    s.file("signed.wasm", component);
    s.file("unsigned.wasm", component);
    s.file("detached.wasm", component);
    let text = run(s
        .bare()
        .args(["drivers", "sign", "--key", "ours.sec", "signed.wasm"]))
    .ok()
    .out();
    assert!(text.contains(&format!("with key id {ours}")), "{text}");
    let signed = fs::read(s.path("signed.wasm")).unwrap();
    assert!(signed.starts_with(b"\0asm") && signed.len() > component.len());
    run(s.bare().args([
        "drivers",
        "sign",
        "--key",
        "ours.sec",
        "--detached",
        "detached.wasm",
    ]))
    .ok();
    assert_eq!(
        fs::read(s.path("detached.wasm")).unwrap(),
        component,
        "unchanged"
    );
    assert!(s.path("detached.wasm.sig").exists());
    let mut tampered = signed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    s.file("tampered.wasm", &tampered);

    // verify: the key ids found, which key verifies it; exit 1 if none.
    let text = run(s.bare().args([
        "drivers",
        "verify",
        "--key",
        "theirs.pub",
        "--key",
        "ours.pub",
        "signed.wasm",
    ]))
    .ok()
    .out();
    assert!(
        text.contains(&format!("key ids:     {ours}"))
            && text.contains(&format!("verified by: key id {ours} (ours.pub)")),
        "{text}"
    );
    let doc = run(s.bare().args([
        "--json",
        "drivers",
        "verify",
        "--key",
        "ours.pub",
        "detached.wasm",
    ]))
    .ok()
    .json();
    assert_eq!(doc["verified"], true, "{doc}");
    assert_eq!(doc["form"], "detached", "{doc}");
    let r = run(s.bare().args([
        "--json",
        "drivers",
        "verify",
        "--key",
        "theirs.pub",
        "signed.wasm",
    ]))
    .fails(1, "no given key verifies it");
    assert_eq!(r.json()["verified"], false);
    assert_eq!(r.json()["key_ids"][0], ours.as_str());
    run(s
        .bare()
        .args(["drivers", "verify", "--key", "ours.pub", "unsigned.wasm"]))
    .fails(1, "it carries no signature");
    run(s
        .bare()
        .args(["drivers", "verify", "--key", "ours.pub", "tampered.wasm"]))
    .fails(1, "no given key verifies it");

    // Trust: the signed copies load, the others are refused before they
    // are compiled (nothing lands in a fresh artifact directory).
    let trusting = |driver: &str| {
        let mut cmd = s.cmd();
        cmd.env("XDG_CACHE_HOME", s.path("xdg")).args([
            "--driver-trust",
            "ours.pub",
            "--driver",
            driver,
            "--no-fallback",
            "list-cached",
        ]);
        run(&mut cmd)
    };
    for (driver, refusal) in [
        (
            "./unsigned.wasm",
            format!(
                "it carries no signature (neither embedded nor in a detached .sig file beside it); a driver must be signed by one of the trusted keys (key id {ours}); refused before compiling it"
            ),
        ),
        (
            "./tampered.wasm",
            format!("the signature by trusted key id {ours} does not match its bytes"),
        ),
    ] {
        trusting(driver).fails(1, &refusal);
        assert!(
            !s.path("xdg/image-cache/compiled").exists(),
            "nothing compiled for {driver}"
        );
    }
    trusting("./signed.wasm").ok();
    trusting("./detached.wasm").ok();
    // A wrong key, through the environment; several keys, comma-separated.
    let r = run(s.cmd().env("IMAGE_CACHE_DRIVER_TRUST", "theirs.pub").args([
        "--driver",
        "./signed.wasm",
        "--no-fallback",
        "size",
    ]));
    r.fails(
        1,
        &format!("no trusted key verifies it: it carries an embedded signature by key id {ours} (trusted: key id {theirs})"),
    );
    run(s
        .cmd()
        .env("IMAGE_CACHE_DRIVER_TRUST", "theirs.pub,ours.pub")
        .args(["--driver", "./signed.wasm", "--no-fallback", "size"]))
    .ok();
    // The config file's list, relative to the file.
    fs::create_dir_all(s.path("etc")).unwrap();
    fs::copy(s.path("theirs.pub"), s.path("etc/theirs.pub")).unwrap();
    s.file(
        "etc/glance-cache.conf",
        b"[DEFAULT]\nimage_cache_driver_trusted_keys = theirs.pub\n",
    );
    s.run(&[
        "--config",
        "etc/glance-cache.conf",
        "--driver",
        "./signed.wasm",
        "--no-fallback",
        "size",
    ])
    .fails(1, &format!("(trusted: key id {theirs})"));
    // Without --no-fallback a refused driver falls back to the built-in
    // sqlite driver, which is part of the binary, with a warning.
    let r = s
        .run(&[
            "--driver-trust",
            "ours.pub",
            "--driver",
            "./unsigned.wasm",
            "size",
        ])
        .ok();
    assert!(
        r.stderr.contains("refused before compiling it")
            && r.stderr.contains("falling back to the sqlite driver"),
        "{}",
        r.stderr
    );
    // inspect says who signed it and whether the trusted keys verify it.
    let text = run(s.bare().args([
        "--driver-trust",
        "ours.pub",
        "drivers",
        "inspect",
        "signed.wasm",
    ]))
    .ok()
    .out();
    assert!(
        text.contains(&format!(
            "signature:     embedded, by key id {ours} (verified by a trusted key)"
        )),
        "{text}"
    );
    // A key file that is missing or secret is a usage error.
    s.run(&["--driver-trust", "missing.pub", "size"])
        .fails(2, "key file missing.pub");
    s.run(&["--driver-trust", "ours.sec", "size"])
        .fails(2, "it is a secret key");
}

/// A full disk is an exit code of its own (4) and, with `--json`, the
/// `io` error's file-system code `no-space`; nothing is cached. Needs a
/// small file system: a 2 MiB tmpfs, mounted where the test may (root);
/// skipped with a printed reason elsewhere.
#[test]
fn a_full_disk_is_its_own_exit_code() {
    let Some(fs) = image_cache_tests::SmallFs::mount("2m") else {
        return;
    };
    let top = tempfile::tempdir().unwrap();
    let small = fs.path().to_path_buf();
    let root = small.join("cache");
    let image = top.path().join("image");
    std::fs::write(&image, vec![7u8; 4 << 20]).unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(image_cache_tests::cli_binary())
            .arg("--dir")
            .arg(&root)
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["--json", "cache", "big", "--from", image.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["kind"], "io", "{doc}");
    assert_eq!(doc["error"]["io_code"], "no-space", "{doc}");
    let listed = cli(&["--json", "list-cached"]);
    assert!(listed.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(doc["images"].as_array().map(Vec::len), Some(0), "{doc}");
    // Room made (the failed fill's file is cleaned), a small image fits.
    assert!(cli(&["clean", "--stall-time", "0"]).status.success());
    std::fs::write(&image, b"small").unwrap();
    let out = cli(&["cache", "small", "--from", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The file system's refusal keeps its kind to the exit code: a queue
/// directory the cache's user may not write is `access-denied`, exit 6, not
/// a generic failure. Root runs the tool as `nobody` (util-linux's
/// `setpriv`); skipped with a printed reason elsewhere.
#[test]
fn access_denied_is_its_own_exit_code() {
    use std::os::unix::fs::{PermissionsExt, chown};
    let setpriv = Path::new("/usr/bin/setpriv");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !setpriv.exists() {
        eprintln!("skipped: needs root and /usr/bin/setpriv to run the tool as nobody");
        return;
    }
    let s = Sandbox::new();
    s.run(&["queue", "first"]).ok();
    fs::set_permissions(s.path(""), fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = Some(65534);
    let xdg = s.path("xdg");
    fs::create_dir(&xdg).unwrap();
    // Everything is nobody's but the queue directory.
    for path in [
        s.root(),
        s.root().join("cache.db"),
        s.root().join("incomplete"),
        s.root().join("invalid"),
        xdg.clone(),
    ] {
        chown(&path, nobody, nobody).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        run(Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin())
            .arg("--dir")
            .arg(s.root())
            .args(args)
            .current_dir(s.path(""))
            .env("XDG_CACHE_HOME", &xdg)
            .env_remove("IMAGE_CACHE_DIR")
            .env_remove("IMAGE_CACHE_DRIVER")
            .env_remove("IMAGE_CACHE_CONFIG")
            .stdin(Stdio::null()))
    };
    let denied = as_nobody(&["--json", "queue", "second"]).fails(6, "Permission denied");
    let doc = denied.json();
    assert_eq!(doc["error"]["kind"], "io", "{doc}");
    assert_eq!(doc["error"]["io_code"], "access-denied", "{doc}");
    // What needs no write to the queue still works, and nothing changed.
    let queued = as_nobody(&["--json", "list-queued"]).ok().json();
    assert_eq!(queued["queued"], serde_json::json!(["first"]), "{queued}");
}

/// A write of the sqlite driver's database that finds the disk full
/// (SQLite's `SQLITE_FULL` inside the driver, from the host's `no-space`)
/// is a full disk too, not a database failure: exit 4 and `no-space`, so
/// the operator makes room rather than looks for a database outage. Needs
/// a small file system (root); skipped with a printed reason elsewhere.
#[test]
fn a_full_disk_under_the_drivers_database_is_no_space_too() {
    let Some(fs) = image_cache_tests::SmallFs::mount("2m") else {
        return;
    };
    let top = tempfile::tempdir().unwrap();
    let root = fs.path().join("cache");
    let image = top.path().join("image");
    std::fs::write(&image, vec![7u8; 4 << 10]).unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(image_cache_tests::cli_binary())
            .arg("--dir")
            .arg(&root)
            .args(args)
            .output()
            .unwrap()
    };
    let cached = cli(&["cache", "img", "--from", image.to_str().unwrap()]);
    assert!(
        cached.status.success(),
        "{}",
        String::from_utf8_lossy(&cached.stderr)
    );
    // The driver keeps its rollback journal between transactions
    // (journal_mode=PERSIST), so a small one reuses its blocks: start from
    // none, as after a restart, so that recording the hit needs new room.
    let journal = root.join("cache.db-journal");
    assert!(journal.exists(), "the journal is kept");
    std::fs::remove_file(&journal).unwrap();
    // Fill the file system to the last byte, outside the cache's root.
    let filler = fs.fill();
    // Reading needs no room; recording its hit writes the database.
    let copy = top.path().join("copy");
    let out = cli(&["--json", "read", "img", "--to", copy.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["kind"], "io", "{doc}");
    assert_eq!(doc["error"]["io_code"], "no-space", "{doc}");
    // Room made: the hit is recorded again.
    std::fs::remove_file(filler).unwrap();
    let out = cli(&["read", "img", "--to", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `drivers push` and `drivers pull` against a real registry on loopback
/// (Debian's docker-registry): wkg's layout, the store, digest pinning,
/// `--driver oci://...` and signature checking on pull.
#[test]
fn push_and_pull_drivers_over_oci() {
    let Some(registry) = image_cache_tests::registry::Registry::start() else {
        return;
    };
    let s = Sandbox::new();
    let component = image_cache::builtin::SQLITE.component;
    let file = s.file("sqlite_driver.wasm", component);
    let sha256 = image_cache::runtime::sha256_hex(component);
    let store = s.path("store");
    let tag = format!("oci://{}/drivers/sqlite:1", registry.address());
    let tool = || {
        let mut cmd = s.bare();
        cmd.arg("--driver-store").arg(&store);
        cmd
    };

    // Over HTTPS (the default) the plain registry does not answer.
    run(tool().args(["drivers", "push", file.to_str().unwrap(), &tag])).fails(1, "--plain-http");
    let pushed = run(tool().args([
        "--json",
        "drivers",
        "push",
        "--plain-http",
        file.to_str().unwrap(),
        &tag,
    ]))
    .ok()
    .json();
    assert_eq!(pushed["sha256"], sha256.as_str(), "{pushed}");
    let digest = pushed["manifest_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{pushed}");

    // The manifest as wkg writes and reads it.
    let (status, raw) = registry
        .get(
            "/v2/drivers/sqlite/manifests/1",
            "application/vnd.oci.image.manifest.v1+json",
        )
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(
        format!("sha256:{}", image_cache::runtime::sha256_hex(&raw)),
        digest
    );
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["schemaVersion"], 2, "{manifest}");
    assert_eq!(
        manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{manifest}"
    );
    assert_eq!(
        manifest["config"]["mediaType"], "application/vnd.wasm.config.v0+json",
        "{manifest}"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], "application/wasm");
    assert_eq!(layers[0]["digest"], format!("sha256:{sha256}").as_str());
    assert_eq!(layers[0]["size"], component.len());
    assert_eq!(
        layers[0]["annotations"]["org.opencontainers.image.title"],
        "sqlite_driver.wasm"
    );
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let (status, config) = registry
        .get(
            &format!("/v2/drivers/sqlite/blobs/{config_digest}"),
            "application/vnd.wasm.config.v0+json",
        )
        .unwrap();
    assert_eq!(status, 200);
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["architecture"], "wasm", "{config}");
    assert_eq!(config["os"], "wasip2", "{config}");
    assert_eq!(
        config["layerDigests"],
        serde_json::json!([format!("sha256:{sha256}")]),
        "{config}"
    );
    let created = config["created"].as_str().unwrap();
    assert!(
        created.len() >= 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{config}"
    );
    let exports = config["component"]["exports"].as_array().unwrap();
    assert!(
        exports.iter().any(|e| e
            .as_str()
            .unwrap()
            .starts_with("image-cache:driver/cache-driver@")),
        "{config}"
    );
    assert!(config["component"]["imports"].is_array(), "{config}");
    assert!(config["component"]["target"].is_null(), "{config}");

    // Pull by tag, then by digest: the same file in the store.
    let by_tag = run(tool().args(["--json", "drivers", "pull", "--plain-http", &tag]))
        .ok()
        .json();
    let path = PathBuf::from(by_tag["path"].as_str().unwrap());
    assert_eq!(
        path,
        store.join("sha256").join(format!("{sha256}.wasm")),
        "{by_tag}"
    );
    assert_eq!(fs::read(&path).unwrap(), component);
    assert_eq!(by_tag["manifest_digest"], digest.as_str());
    assert_eq!(by_tag["from_store"], false);
    let pinned = format!("oci://{}/drivers/sqlite@{digest}", registry.address());
    for _ in 0..2 {
        let by_digest = run(tool().args(["--json", "drivers", "pull", "--plain-http", &pinned]))
            .ok()
            .json();
        assert_eq!(by_digest["path"], by_tag["path"], "{by_digest}");
        assert_eq!(by_digest["sha256"], sha256.as_str());
        assert_eq!(fs::read(&path).unwrap(), component);
    }
    // Into an empty store, by digest, over the network.
    let other = s.path("other-store");
    let fresh = run(s.bare().arg("--driver-store").arg(&other).args([
        "--json",
        "drivers",
        "pull",
        "--plain-http",
        &pinned,
    ]))
    .ok()
    .json();
    assert_eq!(fresh["from_store"], false, "{fresh}");
    assert_eq!(
        fs::read(other.join("sha256").join(format!("{sha256}.wasm"))).unwrap(),
        component
    );

    // A digest the registry does not hold is refused; nothing is stored.
    let wrong = format!(
        "oci://{}/drivers/sqlite:1@sha256:{}",
        registry.address(),
        "0".repeat(64)
    );
    let empty = s.path("empty-store");
    run(s.bare().arg("--driver-store").arg(&empty).args([
        "drivers",
        "pull",
        "--plain-http",
        &wrong,
    ]))
    .fails(1, "manifest");
    assert!(!empty.join("sha256").exists());
    // Not OCI references.
    for bad in ["oci://nowhere", "oci://h/Repo", "oci://h/r@sha256:12"] {
        run(tool().args(["drivers", "pull", bad])).fails(2, "not an OCI reference");
    }

    // --driver oci://...@sha256:... runs a command (from the store), the
    // pin applying as to any component file.
    let ls = run(tool()
        .arg("--dir")
        .arg(s.root())
        .args(["--json", "--no-fallback", "--driver", &pinned])
        .args(["--driver-sha256", &sha256, "list-cached"]))
    .ok()
    .json();
    assert_eq!(ls["count"], 0, "{ls}");
    run(tool()
        .arg("--dir")
        .arg(s.root())
        .args(["--no-fallback", "--driver", &pinned])
        .args(["--driver-sha256", &"0".repeat(64), "list-cached"]))
    .fails(1, "");
    // And through the config file, by tag, over the network.
    let conf = s.file(
        "glance-cache.conf",
        format!(
            "[DEFAULT]\nimage_cache_dir = {}\nimage_cache_driver = {tag}\n",
            s.root().display()
        )
        .as_bytes(),
    );
    run(s
        .bare()
        .arg("--driver-store")
        .arg(s.path("conf-store"))
        .arg("--config")
        .arg(&conf)
        .args(["--plain-http", "--no-fallback", "list-cached"]))
    .ok();
    assert!(
        s.path("conf-store")
            .join("sha256")
            .join(format!("{sha256}.wasm"))
            .exists()
    );

    // Under --driver-trust an unsigned component is refused on pull, and
    // not stored.
    run(s.bare().args([
        "drivers",
        "keygen",
        "--secret-key",
        "ours.sec",
        "--public-key",
        "ours.pub",
    ]))
    .ok();
    let trusting = s.path("trusting-store");
    run(s.bare().arg("--driver-store").arg(&trusting).args([
        "--driver-trust",
        "ours.pub",
        "drivers",
        "pull",
        "--plain-http",
        &tag,
    ]))
    .fails(1, "no signature");
    assert!(!trusting.join("sha256").exists());
    // Even from the store, a pull under trust checks the signature.
    run(tool().args([
        "--driver-trust",
        "ours.pub",
        "drivers",
        "pull",
        "--plain-http",
        &pinned,
    ]))
    .fails(1, "no signature");
    // Signed and pushed, it is pulled and runs under the same trust.
    run(s
        .bare()
        .args(["drivers", "sign", "--key", "ours.sec", "sqlite_driver.wasm"]))
    .ok();
    let signed_tag = format!("oci://{}/drivers/sqlite:signed", registry.address());
    run(tool().args([
        "drivers",
        "push",
        "--plain-http",
        "sqlite_driver.wasm",
        &signed_tag,
    ]))
    .ok();
    run(s
        .bare()
        .arg("--driver-store")
        .arg(&trusting)
        .arg("--dir")
        .arg(s.root())
        .args([
            "--driver-trust",
            "ours.pub",
            "--plain-http",
            "--no-fallback",
        ])
        .args(["--driver", &signed_tag, "list-cached"]))
    .ok();
}

/// `wkg` (wasm-pkg-tools) reads what `drivers push` publishes and
/// `drivers pull` reads what `wkg oci push` publishes, byte for byte.
/// Runs where `wkg` is installed (`cargo install wkg`; `$WKG` names it,
/// else it is looked up on PATH); skipped with a printed reason elsewhere
/// (CI does not build it: the layout is also checked by reading the
/// manifest in `push_and_pull_drivers_over_oci`).
#[test]
fn wkg_reads_what_we_push_and_we_read_what_wkg_pushes() {
    let wkg = std::env::var_os("WKG").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("wkg"))
                .find(|p| p.is_file())
        })
    });
    let Some(wkg) = wkg else {
        eprintln!("skipped: wkg is not installed (cargo install wkg, or WKG=/path/to/wkg)");
        return;
    };
    let Some(registry) = image_cache_tests::registry::Registry::start() else {
        return;
    };
    let s = Sandbox::new();
    let component = image_cache::builtin::XATTR.component;
    let file = s.file("xattr_driver.wasm", component);
    let address = registry.address();
    run(s
        .bare()
        .args(["drivers", "push", "--plain-http"])
        .arg(&file)
        .arg(format!("oci://{address}/drivers/ours:1")))
    .ok();
    let pulled = s.path("from-wkg.wasm");
    image_cache_tests::output_ok(
        Command::new(&wkg)
            .args(["oci", "pull", "--insecure", &address])
            .arg(format!("{address}/drivers/ours:1"))
            .arg("-o")
            .arg(&pulled),
    );
    assert!(
        fs::read(&pulled).unwrap() == component,
        "wkg pulled our bytes"
    );

    image_cache_tests::output_ok(
        Command::new(&wkg)
            .args(["oci", "push", "--insecure", &address])
            .arg(format!("{address}/drivers/theirs:1"))
            .arg(&file),
    );
    let ours = run(s
        .bare()
        .arg("--driver-store")
        .arg(s.path("store"))
        .args(["--json", "drivers", "pull", "--plain-http"])
        .arg(format!("oci://{address}/drivers/theirs:1")))
    .ok()
    .json();
    assert_eq!(
        ours["sha256"],
        image_cache::runtime::sha256_hex(component).as_str(),
        "{ours}"
    );
    let stored = PathBuf::from(ours["path"].as_str().unwrap());
    assert!(fs::read(stored).unwrap() == component);
}
