//! Fuzzing of the host's import surface, with a fixed seed in CI and as
//! long a run as you like by hand:
//!
//! ```sh
//! IMAGE_CACHE_FUZZ_SEED=$RANDOM IMAGE_CACHE_FUZZ_ITERATIONS=200000 \
//!     cargo test --test fuzz -- --nocapture
//! ```
//!
//! Four harnesses generate inputs from hostile pieces: paths for every `fs`
//! call (on a root holding symlinks that point at a canary directory beside
//! it), extended attribute names, a driver's own file I/O (read-write opens,
//! reads, writes, truncations and byte-range locks at hostile offsets), and
//! operator config values. A fifth runs the chaos
//! driver component (guest/chaos), whose every call makes 200 random import
//! calls. Each asserts: no panic, the canary unchanged (contents and
//! times), nothing created beside the root or in the working directory,
//! and the cache still works.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use image_cache::config::{parse_duration, parse_size};
use image_cache::fs::RootFs;
use image_cache::{
    CacheConfig, Capability, DriverSource, Error, Grants, ImageCache, Limits, LoadPolicy, Runtime,
};
use image_cache_tests::{canary_state, fixture};

fn iterations(default: u64) -> u64 {
    std::env::var("IMAGE_CACHE_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("IMAGE_CACHE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1234_5678)
}

/// xorshift64*, seeded: the same seed gives the same run.
struct Rng(u64);

impl Rng {
    fn new(salt: u64) -> Rng {
        Rng((seed() ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// A root with traps in it, and a canary directory beside it.
struct Arena {
    _top: tempfile::TempDir,
    top: PathBuf,
    root: PathBuf,
    canary: PathBuf,
    before: Vec<(PathBuf, u64, SystemTime)>,
}

impl Arena {
    fn new() -> Arena {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        let canary = top.path().join("canary");
        std::fs::create_dir_all(root.join("incomplete")).unwrap();
        std::fs::create_dir(&canary).unwrap();
        std::fs::write(canary.join("secret"), b"canary").unwrap();
        rusqlite::Connection::open(canary.join("victim.db"))
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        std::os::unix::fs::symlink(&canary, root.join("link")).unwrap();
        std::os::unix::fs::symlink(canary.join("secret"), root.join("a")).unwrap();
        std::os::unix::fs::symlink("../canary/victim.db", root.join("chaos.db")).unwrap();
        let before = canary_state(&canary);
        Arena {
            top: top.path().to_path_buf(),
            _top: top,
            root,
            canary,
            before,
        }
    }

    fn check(&self, what: &str) {
        assert_eq!(
            canary_state(&self.canary),
            self.before,
            "{what}: canary changed"
        );
        let beside: Vec<_> = std::fs::read_dir(&self.top)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut beside = beside;
        beside.sort();
        assert_eq!(
            beside,
            ["canary", "root"],
            "{what}: something was created beside the root"
        );
        for planted in ["chaos-planted.db", "hostile-planted.db", "copy.db"] {
            assert!(
                !Path::new(planted).exists(),
                "{what}: {planted} in the working directory"
            );
        }
    }
}

const PIECES: &[&str] = &[
    "",
    ".",
    "..",
    "/",
    "a",
    "b",
    "link",
    "incomplete",
    "queue",
    "cache.db",
    "x\0",
    "x\\y",
    "..\\..",
    "%2e%2e",
    "\u{1b}[2J",
    "\u{202e}txt",
    "🙂",
    "secret",
    "/etc/passwd",
    "../canary/secret",
    "link/secret",
    "link/..",
    "a/..",
    "chaos.db",
];

fn random_path(rng: &mut Rng, arena: &Arena) -> String {
    match rng.below(12) {
        0 => arena.canary.join("secret").display().to_string(),
        1 => "n".repeat(rng.below(5000)),
        _ => (0..1 + rng.below(4))
            .map(|_| rng.pick(PIECES))
            .collect::<Vec<_>>()
            .join("/"),
    }
}

const TIMES: &[f64] = &[
    0.0,
    -1.0,
    -1e300,
    1e300,
    f64::NAN,
    f64::INFINITY,
    1.7e9,
    1e12,
    1e12 + 1.0,
    4e9,
    1e-300,
];

#[test]
fn fuzz_fs_paths_stay_in_the_root() {
    let arena = Arena::new();
    let root = RootFs::new(&arena.root).unwrap();
    let mut rng = Rng::new(1);
    let n = iterations(3000);
    let started = Instant::now();
    for _ in 0..n {
        let p = random_path(&mut rng, &arena);
        let q = random_path(&mut rng, &arena);
        let t = || Some(TIMES[(p.len() + q.len()) % TIMES.len()]);
        match rng.below(10) {
            0 => drop(root.open(&p)),
            1 => drop(root.create_new(&p)),
            2 => drop(root.stat(&p)),
            3 => drop(root.create_dir(&p)),
            4 => drop(root.list_dir(&p)),
            5 => drop(root.list_names(&p)),
            6 => drop(root.rename(&p, &q)),
            7 => drop(root.remove_file(&p)),
            8 => drop(root.set_times(&p, t(), t())),
            _ => {
                if let Ok(f) = root.open(&p) {
                    let _ = f.set_times(t(), None);
                    let _ = f.metadata();
                }
            }
        }
    }
    arena.check("fs");
    println!("fuzz fs: {n} calls in {:?}", started.elapsed());
}

#[test]
fn fuzz_xattr_names_only_user_names_pass() {
    let mut rng = Rng::new(2);
    let prefixes = [
        "user.",
        "trusted.",
        "security.",
        "system.",
        "",
        "USER.",
        "user",
        "user..",
    ];
    let n = iterations(3000) * 10;
    for _ in 0..n {
        let mut name = rng.pick(&prefixes).to_string();
        for _ in 0..rng.below(8) {
            name.push_str(rng.pick(PIECES));
        }
        let accepted = image_cache::xattr::check_name(&name).is_ok();
        let expected = name.starts_with("user.")
            && name.len() > 5
            && name.len() <= image_cache::xattr::MAX_NAME
            && !name.contains('\0');
        assert_eq!(accepted, expected, "{name:?}");
    }
    println!("fuzz xattr names: {n} names");
}

/// Offsets and lengths for the driver's own file I/O and range locks.
const OFFSETS: &[u64] = &[
    0,
    1,
    511,
    4096,
    1 << 20,
    (1 << 20) + 1,
    0x4000_0000,
    0x4000_0002,
    u32::MAX as u64,
    16 << 30,
    (16 << 30) + 1,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

#[test]
fn fuzz_driver_file_io_stays_in_its_files_and_bounds() {
    use image_cache::bindings::fs::RangeLock;
    let arena = Arena::new();
    let root = RootFs::new(&arena.root).unwrap();
    let mut rng = Rng::new(3);
    let n = iterations(3000);
    let started = Instant::now();
    let mut files = Vec::new();
    let mut refused = 0u64;
    let offset = |rng: &mut Rng| OFFSETS[rng.below(OFFSETS.len())];
    for _ in 0..n {
        match rng.below(4) {
            0 => {
                let path = random_path(&mut rng, &arena);
                match root.open_read_write(&path, rng.below(2) == 0, "cache.db") {
                    Ok(f) => files.push(f),
                    Err(_) => refused += 1,
                }
            }
            _ if files.is_empty() => {}
            _ => {
                let f = &files[rng.below(files.len())];
                let (a, b) = (offset(&mut rng), offset(&mut rng));
                let lock = match rng.below(3) {
                    0 => RangeLock::Unlocked,
                    1 => RangeLock::Shared,
                    _ => RangeLock::Exclusive,
                };
                let result = match rng.below(6) {
                    0 => f.read_at(a, (b % (2 << 20)) as u32).map(drop),
                    1 => f.write_at(a, &vec![7; (b % (2 << 20)) as usize]),
                    2 => f.set_len(a),
                    3 => f.set_range_lock(a, b, lock).map(drop),
                    4 => f.range_locked_elsewhere(a, b).map(drop),
                    _ => f.size().map(drop),
                };
                refused += result.is_err() as u64;
                if files.len() > 16 {
                    files.remove(rng.below(files.len()));
                }
            }
        }
    }
    drop(files);
    arena.check("driver file io");
    // Only the database and its journal were made at the top of the root.
    let mut top: Vec<String> = std::fs::read_dir(&arena.root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    for name in &top {
        assert!(
            [
                "a",
                "cache.db",
                "cache.db-journal",
                "cache.db-wal",
                "chaos.db",
                "incomplete",
                "link"
            ]
            .contains(&name.as_str())
                || std::fs::metadata(arena.root.join(name)).unwrap().is_dir(),
            "{name} was created at the top of the root: {top:?}"
        );
        let len = std::fs::symlink_metadata(arena.root.join(name))
            .unwrap()
            .len();
        assert!(
            len <= image_cache::fs::MAX_DRIVER_FILE,
            "{name}: {len} bytes"
        );
    }
    println!(
        "fuzz driver file io: {n} calls ({refused} refused) in {:?}",
        started.elapsed()
    );
}

#[test]
fn fuzz_config_values_never_panic() {
    let mut rng = Rng::new(4);
    let pieces = [
        "1",
        "0",
        "9",
        ".",
        "-",
        "e",
        "k",
        "K",
        "M",
        "G",
        "T",
        "iB",
        "B",
        "s",
        "m",
        "h",
        "d",
        "w",
        "99999999999999999999",
        "18446744073709551615",
        "1e308",
        " ",
        "\u{0}",
        "NaN",
        "inf",
    ];
    let n = iterations(3000) * 10;
    for _ in 0..n {
        let s: String = (0..rng.below(6)).map(|_| rng.pick(&pieces)).collect();
        if let Ok(size) = parse_size(&s) {
            assert!(size as f64 <= u64::MAX as f64, "{s:?}");
        }
        let _ = parse_duration(&s);
    }
    println!("fuzz config values: {n} strings");
}

#[test]
fn fuzz_the_chaos_driver_calls_every_import_at_random() {
    let arena = Arena::new();
    let limits = Limits {
        call_deadline: Duration::from_millis(1500),
        memory_bytes: 128 << 20,
        ..Limits::default()
    };
    let mut config = CacheConfig::new(&arena.root)
        .driver(DriverSource::File(fixture("chaos_driver")))
        .fallback_to_sqlite(false)
        .policy(LoadPolicy {
            sha256: None,
            grants: Grants::of(&[Capability::Xattr]),
            ..Default::default()
        });
    config.driver_options = vec![(
        "chaos_target".to_string(),
        arena.canary.join("victim.db").display().to_string(),
    )];
    let cache = ImageCache::with_runtime(
        Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap(),
        config,
    )
    .unwrap();
    let seeds = (iterations(3000) / 100).max(5);
    let first = seed();
    let started = Instant::now();
    let (mut completed, mut faults) = (0, 0);
    for s in first..first + seeds {
        match cache.is_cached(&s.to_string()) {
            Ok(true) => completed += 1,
            Err(Error::DriverFault { message, .. }) => {
                assert!(
                    !message.contains("the host failed while serving it"),
                    "seed {s}: a host panic: {message}"
                );
                faults += 1;
            }
            other => panic!("seed {s}: {other:?}"),
        }
        assert!(
            !cache.is_cached("benign").unwrap(),
            "seed {s}: the next call works"
        );
    }
    arena.check("chaos");
    println!(
        "fuzz chaos driver: {seeds} seeds x 200 import calls ({completed} completed, {faults} stopped) in {:?}",
        started.elapsed()
    );
}
