//! The shared scenarios (`tests/scenarios/conformance.json`), played by the
//! Rust host against every built-in driver. The Python and Node hosts play
//! the same file (hosts/python, hosts/node); the format is in
//! `tests/scenarios/README.md`.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use image_cache::{
    CacheConfig, Checksum, DriverSource, Error, Grants, ImageCache, ImageWriter, Limits,
    LoadPolicy, Runtime,
};
use image_cache_tests::{TestCache, canary_state, driver};
use serde_json::{Value, json};

fn scenarios(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Bytes from a data value: a string, `{pattern, len}` or `{concat}`.
fn data(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Object(o) if o.contains_key("pattern") => {
            let seed = o["pattern"].as_u64().expect("pattern") as u8;
            let len = o["len"].as_u64().expect("len") as usize;
            image_cache_tests::image_bytes(seed, len)
        }
        Value::Object(o) if o.contains_key("concat") => o["concat"]
            .as_array()
            .expect("concat list")
            .iter()
            .flat_map(data)
            .collect(),
        other => panic!("not a data value: {other}"),
    }
}

/// `expected` matches `actual` as the README says: objects by the keys
/// `expected` names, lists element by element, the rest by equality.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av))),
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(x, y)| matches(x, y))
        }
        (Value::Number(e), Value::Number(a)) => e.as_f64() == a.as_f64(),
        _ => expected == actual,
    }
}

/// A source that yields its chunks, then fails if asked to.
struct Chunks {
    chunks: Vec<Vec<u8>>,
    fail_at_end: bool,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(first) = self.chunks.first_mut() {
            if first.is_empty() {
                self.chunks.remove(0);
                continue;
            }
            let n = first.len().min(buf.len());
            buf[..n].copy_from_slice(&first[..n]);
            first.drain(..n);
            return Ok(n);
        }
        if self.fail_at_end {
            return Err(io::Error::other("connection reset by the image store"));
        }
        Ok(0)
    }
}

/// One scenario played against one driver.
struct Player {
    root: PathBuf,
    cache: Arc<ImageCache>,
    /// Opens another handle on the same root, as the first was opened.
    open: Box<dyn Fn() -> ImageCache>,
    sessions: HashMap<String, ImageWriter>,
    last_passed: Vec<u8>,
}

enum Outcome {
    Value(Value),
    Bytes(Vec<u8>),
}

impl Player {
    fn new(root: &Path, open: Box<dyn Fn() -> ImageCache>) -> Player {
        Player {
            root: root.to_path_buf(),
            cache: Arc::new(open()),
            open,
            sessions: HashMap::new(),
            last_passed: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    fn step(&mut self, op: &str, a: &Value) -> Result<Outcome, Error> {
        let id = || a["id"].as_str().expect("id").to_string();
        let session = || a["session"].as_str().expect("session").to_string();
        let c = self.cache.clone();
        let v = |x: Value| Ok(Outcome::Value(x));
        match op {
            "is_cached" => v(json!(c.is_cached(&id())?)),
            "is_cacheable" => v(json!(c.is_cacheable(&id())?)),
            "is_being_cached" => v(json!(c.is_being_cached(&id())?)),
            "is_queued" => v(json!(c.is_queued(&id())?)),
            "queue_image" => v(json!(c.queue_image(&id())?)),
            "get_queued_images" => v(json!(c.get_queued_images()?)),
            "get_hit_count" => v(json!(c.get_hit_count(&id())?)),
            "get_image_size" => v(json!(c.get_image_size(&id())?)),
            "get_cache_size" => v(json!(c.get_cache_size()?)),
            "get_cached_images" => v(Value::Array(
                c.get_cached_images()?
                    .into_iter()
                    .map(|i| {
                        json!({"image_id": i.image_id, "hits": i.hits, "size": i.size,
                               "last_modified": i.last_modified, "last_accessed": i.last_accessed})
                    })
                    .collect(),
            )),
            "delete_cached_image" => v(json!(c.delete_cached_image(&id())?)),
            "delete_queued_image" => v(json!(c.delete_queued_image(&id())?)),
            "delete_all_cached_images" => v(json!(c.delete_all_cached_images()?)),
            "delete_all_queued_images" => v(json!(c.delete_all_queued_images()?)),
            "get_least_recently_accessed" => v(match c.get_least_recently_accessed()? {
                Some((id, size)) => json!([id, size]),
                None => Value::Null,
            }),
            "get_least_recently_accessed_batch" => {
                let count = a["count"].as_u64().expect("count") as u32;
                v(Value::Array(
                    c.get_least_recently_accessed_batch(count)?
                        .into_iter()
                        .map(|e| json!({"image_id": e.image_id, "size": e.size, "last_accessed": e.last_accessed}))
                        .collect(),
                ))
            }
            "clean" => {
                let stall = a["stall_time"].as_u64().unwrap_or(86_400);
                let r = c.clean(Duration::from_secs(stall))?;
                let ids = |files: Vec<image_cache::RemovedFile>| {
                    let mut ids: Vec<String> = files.into_iter().map(|f| f.image_id).collect();
                    ids.sort();
                    ids
                };
                v(
                    json!({"invalid": ids(r.invalid), "incomplete": ids(r.incomplete),
                         "failures": r.failures.len()}),
                )
            }
            "prune" => {
                let r = c.prune(a["max_size"].as_u64().expect("max_size"))?;
                let removed: Vec<String> = r.removed.into_iter().map(|f| f.image_id).collect();
                v(json!({"removed": removed, "bytes_removed": r.bytes_removed,
                         "size_after": r.size_after}))
            }
            "put" => {
                c.cache_reader(&id(), None, &data(&a["data"])[..])?;
                v(Value::Null)
            }
            "get" => {
                let mut out = Vec::new();
                c.read_image(&id(), &mut out)?;
                Ok(Outcome::Bytes(out))
            }
            "read_partial" => {
                let mut reader = c.open_for_read(&id())?;
                let mut buf = vec![0u8; a["bytes"].as_u64().expect("bytes") as usize];
                reader
                    .read_exact(&mut buf)
                    .map_err(|e| Error::io("scenario bytes", &e))?;
                drop(reader);
                v(Value::Null)
            }
            "open_for_write" => {
                let writer = c.open_for_write(&id())?;
                self.sessions.insert(session(), writer);
                v(Value::Null)
            }
            "write" => {
                let w = self.sessions.get_mut(&session()).expect("open session");
                io::Write::write_all(w, &data(&a["data"]))
                    .map_err(|e| Error::io("scenario bytes", &e))?;
                v(Value::Null)
            }
            "commit" => {
                let w = self.sessions.remove(&session()).expect("open session");
                let checksum: Option<Checksum> =
                    a["checksum"].as_str().map(|s| s.parse().expect("checksum"));
                w.commit(checksum.as_ref())?;
                v(Value::Null)
            }
            "abort" => {
                let w = self.sessions.remove(&session()).expect("open session");
                w.abort(a["reason"].as_str().unwrap_or("aborted"))?;
                v(Value::Null)
            }
            "drop" => {
                drop(self.sessions.remove(&session()).expect("open session"));
                v(Value::Null)
            }
            "cache_stream" => {
                let chunks = a["chunks"]
                    .as_array()
                    .expect("chunks")
                    .iter()
                    .map(data)
                    .collect();
                let source = Chunks {
                    chunks,
                    fail_at_end: a["fail_at_end"].as_bool().unwrap_or(false),
                };
                let checksum: Option<Checksum> =
                    a["checksum"].as_str().map(|s| s.parse().expect("checksum"));
                let mut sink = Vec::new();
                let result = c.cache_stream(&id(), checksum.as_ref(), source, &mut sink);
                self.last_passed = sink;
                let r = result?;
                v(json!({"cached": r.cached, "bytes": r.bytes}))
            }
            "last_passed" => Ok(Outcome::Bytes(self.last_passed.clone())),
            "concurrent_gets" => {
                let id = id();
                let expected = data(&a["data"]);
                let threads = a["threads"].as_u64().expect("threads");
                let each = a["each"].as_u64().expect("each");
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let (c, id, expected) = (c.clone(), id.clone(), expected.clone());
                        std::thread::spawn(move || {
                            (0..each)
                                .filter(|_| {
                                    let mut out = Vec::new();
                                    c.read_image(&id, &mut out).is_ok() && out == expected
                                })
                                .count() as u64
                        })
                    })
                    .collect();
                let good: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
                v(json!(good))
            }
            "write_file" => {
                let path = self.root().join(a["path"].as_str().expect("path"));
                std::fs::write(&path, data(&a["data"])).unwrap();
                if let Some(age) = a["age"].as_u64() {
                    let t = SystemTime::now() - Duration::from_secs(age);
                    std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
                        .unwrap();
                }
                v(Value::Null)
            }
            "mkdir" => {
                std::fs::create_dir_all(self.root().join(a["path"].as_str().expect("path")))
                    .unwrap();
                v(Value::Null)
            }
            "list_files" => {
                let dir = self.root().join(a["dir"].as_str().unwrap_or(""));
                let mut names: Vec<String> = std::fs::read_dir(dir)
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                v(json!(names))
            }
            "reopen" => {
                self.cache = Arc::new((self.open)());
                v(Value::Null)
            }
            other => panic!("unknown op {other:?}: a runner must never skip a step"),
        }
    }
}

/// Play one scenario; the first failing step, described.
fn play(scenario: &Value, player: &mut Player) -> Result<(), String> {
    let none = json!({});
    for (i, step) in scenario["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .enumerate()
    {
        let op = step["op"].as_str().expect("op");
        let args = step.get("args").unwrap_or(&none);
        let here = format!("step {i} ({op} {args})");
        let outcome = player.step(op, args);
        match (step.get("expect"), step.get("expect_error"), outcome) {
            (_, Some(want), Err(e)) => {
                let kind = want["kind"].as_str().expect("kind");
                if e.kind() != kind {
                    return Err(format!(
                        "{here}: expected a {kind} error, got {} ({e})",
                        e.kind()
                    ));
                }
                if let Some(needle) = want.get("message_contains").and_then(Value::as_str)
                    && !e.to_string().contains(needle)
                {
                    return Err(format!("{here}: error {e:?} lacks {needle:?}"));
                }
            }
            (_, Some(want), Ok(_)) => {
                return Err(format!("{here}: expected error {want}, it succeeded"));
            }
            (_, None, Err(e)) => return Err(format!("{here}: failed: {e}")),
            (Some(want), None, Ok(Outcome::Bytes(bytes))) => {
                if bytes != data(want) {
                    return Err(format!(
                        "{here}: {} bytes differ from the expected",
                        bytes.len()
                    ));
                }
            }
            (Some(want), None, Ok(Outcome::Value(got))) => {
                if !matches(want, &got) {
                    return Err(format!("{here}: expected {want}, got {got}"));
                }
            }
            (None, None, Ok(_)) => {}
        }
    }
    Ok(())
}

#[test]
fn every_shared_scenario_passes_for_every_builtin_driver() {
    let doc = scenarios("conformance.json");
    assert_eq!(doc["format"], 1, "a runner for format 1");
    let all = doc["scenarios"].as_array().expect("scenarios");
    assert!(!all.is_empty(), "no scenarios: nothing would be tested");
    let mut failures = Vec::new();
    let mut played = 0;
    for scenario in all {
        let name = scenario["name"].as_str().expect("name");
        let drivers: Vec<String> = match scenario.get("drivers") {
            Some(list) => list
                .as_array()
                .expect("drivers")
                .iter()
                .map(|d| d.as_str().expect("driver").to_string())
                .collect(),
            None => vec!["sqlite".into(), "xattr".into()],
        };
        for d in drivers {
            played += 1;
            let source = driver(&d).expect("built-in driver");
            let test = TestCache::new(&source);
            let root = test.root().to_path_buf();
            let opener = source.clone();
            let open_root = root.clone();
            let mut player = Player::new(
                &root,
                Box::new(move || image_cache_tests::open(&open_root, &opener)),
            );
            if let Err(e) = play(scenario, &mut player) {
                failures.push(format!("{name} [{d}]: {e}"));
            }
        }
    }
    println!("{played} scenario runs, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "failing scenarios:\n{}",
        failures.join("\n")
    );
}

/// What every host must refuse (`hostile.json`), against the hostile
/// fixture component, with a directory beside the root that must not change.
#[test]
fn every_hostile_scenario_is_refused_as_every_host_refuses_it() {
    let doc = scenarios("hostile.json");
    assert_eq!(doc["format"], 1);
    let component = image_cache_tests::fixture(doc["component"].as_str().expect("component"));
    let grants = Grants::parse(
        &doc["grants"]
            .as_array()
            .expect("grants")
            .iter()
            .map(|g| g.as_str().expect("grant"))
            .collect::<Vec<_>>()
            .join(","),
    )
    .expect("grants");
    let deadline = Duration::from_millis(
        doc["limits"]["call_deadline_ms"]
            .as_u64()
            .expect("deadline"),
    );
    let runtime = Runtime::new(
        Limits {
            call_deadline: deadline,
            ..Limits::default()
        },
        Some(image_cache_tests::artifact_dir()),
    )
    .unwrap();
    let all = doc["scenarios"].as_array().expect("scenarios");
    assert!(!all.is_empty());
    let mut failures = Vec::new();
    for scenario in all {
        let name = scenario["name"].as_str().expect("name");
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        let outside = top.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        rusqlite::Connection::open(outside.join("victim.db"))
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let before = canary_state(&outside);
        let options: Vec<(String, String)> = doc["options"]
            .as_array()
            .expect("options")
            .iter()
            .map(|pair| {
                let value = pair[1].as_str().expect("value");
                (
                    pair[0].as_str().expect("name").to_string(),
                    value.replace("$OUTSIDE", &outside.display().to_string()),
                )
            })
            .collect();
        let (rt, component, open_root) = (runtime.clone(), component.clone(), root.clone());
        let open = move || {
            let mut config = CacheConfig::new(&open_root)
                .driver(DriverSource::File(component.clone()))
                .fallback_to_sqlite(false)
                .policy(LoadPolicy {
                    sha256: None,
                    grants,
                    ..Default::default()
                });
            config.driver_options = options.clone();
            ImageCache::with_runtime(rt.clone(), config).expect("the hostile driver loads")
        };
        let mut player = Player::new(&root, Box::new(open));
        if let Err(e) = play(scenario, &mut player) {
            failures.push(format!("{name}: {e}"));
        }
        drop(player);
        if canary_state(&outside) != before {
            failures.push(format!("{name}: the directory beside the root changed"));
        }
    }
    assert!(
        failures.is_empty(),
        "failing scenarios:\n{}",
        failures.join("\n")
    );
}
