//! The centralized driver on a real PostgreSQL (see `support/pg.rs`): many
//! nodes in one database, Glance's own schema, the database going away and
//! coming back, switching drivers on a live root, and what a driver's SQL
//! may not do. (The conformance suite runs on it too: `conformance
//! centralized::`.)

use std::time::{Duration, Instant};

use image_cache::bindings::database::{ErrorCode, Value};
use image_cache::database::{CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings};
use image_cache::limits::Deadline;
use image_cache::{CacheConfig, DriverSource, Error, ImageCache, Limits};
use image_cache_tests::pg::{self, PASSWORD, TestDatabase};
use image_cache_tests::{PgSetup, bad_configuration, cached_ids, cli_binary, image_bytes, runtime};

/// The same driver on MariaDB.
#[path = "centralized/mariadb.rs"]
mod on_mariadb;

/// Sibling fill across serve nodes sharing one PostgreSQL.
#[path = "centralized/siblings.rs"]
mod siblings;

const CENTRALIZED: DriverSource = DriverSource::Builtin("centralized");
const SQLITE: DriverSource = DriverSource::Builtin("sqlite");

/// A cache on `root` with the centralized driver as node `node` of `pg`.
fn node(root: &std::path::Path, pg: &PgSetup, node: &str) -> ImageCache {
    let mut config = CacheConfig::new(root)
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    pg.configure_node(&mut config, node);
    ImageCache::with_runtime(runtime(), config).expect("a centralized cache")
}

/// A centralized node on `databases` whose driver calls end after 3 s
/// (a runtime of its own: the deadline is the runtime's).
fn node_with_short_deadline(
    root: &std::path::Path,
    databases: std::sync::Arc<DatabaseRoot>,
    node: &str,
) -> ImageCache {
    let mut config = CacheConfig::new(root)
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    let limits = Limits {
        call_deadline: Duration::from_secs(3),
        ..Limits::default()
    };
    config.limits = limits.clone();
    config.databases = databases;
    config
        .driver_options
        .push(("worker_self_reference_url".into(), node.into()));
    let runtime =
        image_cache::Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap();
    ImageCache::with_runtime(runtime, config).unwrap()
}

fn put(cache: &ImageCache, id: &str, bytes: &[u8]) {
    cache.cache_reader(id, None, bytes).unwrap();
}

fn get(cache: &ImageCache, id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    cache.read_image(id, &mut out).unwrap();
    out
}

const UUID_A: &str = "6f1e9d2a-4a8b-4c3e-9d7f-0a1b2c3d4e5f";
const UUID_B: &str = "0c9b8a7d-6e5f-4a3b-8c1d-2e3f4a5b6c7d";

#[test]
fn two_nodes_share_one_database_and_keep_their_own_caches() {
    let pg = PgSetup::new();
    let (one_dir, two_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = node(one_dir.path(), &pg, "http://node-1:9292");
    let two = node(two_dir.path(), &pg, "http://node-2:9292");

    put(&one, UUID_A, &image_bytes(1, 1000));
    put(&two, UUID_A, &image_bytes(1, 1000));
    put(&two, UUID_B, &image_bytes(2, 3000));

    assert_eq!(cached_ids(&one), [UUID_A]);
    assert_eq!(cached_ids(&two), [UUID_B, UUID_A]);
    let both = ["http://node-1:9292", "http://node-2:9292"];
    assert_eq!(one.get_cached_nodes(UUID_A).unwrap(), both);
    assert_eq!(two.get_cached_nodes(UUID_A).unwrap(), both);
    assert_eq!(
        one.get_cached_nodes(UUID_B).unwrap(),
        ["http://node-2:9292"]
    );
    assert!(one.get_cached_nodes("never").unwrap().is_empty());

    // Hits are per node.
    get(&one, UUID_A);
    get(&one, UUID_A);
    assert_eq!(one.get_hit_count(UUID_A).unwrap(), 2);
    assert_eq!(two.get_hit_count(UUID_A).unwrap(), 0);
    assert_eq!(one.get_cache_size().unwrap(), 1000);
    assert_eq!(two.get_cache_size().unwrap(), 4000);

    // Pruning node 2 leaves node 1 alone.
    let report = two.prune(0).unwrap();
    assert_eq!(report.removed.len(), 2);
    assert!(cached_ids(&two).is_empty());
    assert_eq!(cached_ids(&one), [UUID_A]);
    assert_eq!(one.get_hit_count(UUID_A).unwrap(), 2);
    assert_eq!(
        one.get_cached_nodes(UUID_A).unwrap(),
        ["http://node-1:9292"]
    );

    // Deleting on node 1 touches only its rows.
    put(&two, UUID_A, &image_bytes(1, 1000));
    one.delete_cached_image(UUID_A).unwrap();
    assert_eq!(
        two.get_cached_nodes(UUID_A).unwrap(),
        ["http://node-2:9292"]
    );
    assert_eq!(one.delete_all_cached_images().unwrap(), 0);
    assert_eq!(cached_ids(&two), [UUID_A]);

    // What Glance sees in its tables.
    let rows = pg.db.sql(
        "SELECT n.node_reference_url || ' ' || c.image_id || ' ' || c.hits FROM cached_images c \
         JOIN node_reference n USING (node_reference_id) ORDER BY 1",
    );
    assert_eq!(rows, format!("http://node-2:9292 {UUID_A} 0"));
    assert_eq!(
        pg.db.sql("SELECT count(*) FROM node_reference"),
        "2",
        "one node_reference row per node"
    );
}

#[test]
fn two_nodes_write_at_once() {
    let pg = PgSetup::new();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let caches: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| node(d.path(), &pg, &format!("http://node-{i}:9292")))
        .collect();
    std::thread::scope(|s| {
        for cache in &caches {
            s.spawn(move || {
                for i in 0..40 {
                    put(cache, &format!("img-{i:03}"), &image_bytes(i as u8, 100));
                    get(cache, &format!("img-{i:03}"));
                }
            });
        }
    });
    for cache in &caches {
        assert_eq!(cached_ids(cache).len(), 40);
        assert_eq!(cache.get_hit_count("img-007").unwrap(), 1);
        assert_eq!(cache.get_cached_nodes("img-007").unwrap().len(), 2);
    }
    assert_eq!(pg.db.sql("SELECT count(*) FROM cached_images"), "80");
}

/// Glance's 2024.1 migration as SQLAlchemy emits it on PostgreSQL.
const GLANCE_DDL: &str = "
CREATE TABLE node_reference (
    node_reference_id BIGSERIAL NOT NULL,
    node_reference_url VARCHAR(255) NOT NULL,
    PRIMARY KEY (node_reference_id),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
);
CREATE TABLE cached_images (
    id BIGSERIAL NOT NULL,
    image_id VARCHAR(36) NOT NULL,
    last_accessed TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
);";

/// The tables' columns and constraints, as the catalog describes them.
fn schema_of(db: &TestDatabase) -> String {
    db.sql(
        "SELECT string_agg(x, E'\\n' ORDER BY x) FROM ( \
           SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || \
                  coalesce(character_maximum_length::text, '-') || ' ' || is_nullable || ' ' || \
                  coalesce(column_default, '-') AS x \
           FROM information_schema.columns WHERE table_schema = 'public' \
           UNION ALL \
           SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
           FROM pg_constraint WHERE connamespace = 'public'::regnamespace) s",
    )
}

#[test]
fn tables_made_by_glance_work_as_they_are_and_db_init_makes_the_same() {
    let (_use, cluster) = pg::postgres();
    let glance = cluster.bare_database();
    // Glance's migrations make the tables (here as the administrator, who
    // owns them); the cache's role gets what `image-cache db grants` says.
    glance.sql(GLANCE_DDL);
    glance.grant_cache_privileges(pg::ROLE);
    let before = schema_of(&glance);
    assert!(before.contains("cached_images.last_accessed timestamp without time zone"));
    // Glance's API node cached an image (naive UTC times).
    glance.sql(&format!(
        "INSERT INTO node_reference (node_reference_url) VALUES ('http://glance-api:9292'), ('http://us:9292'); \
         INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
         SELECT '{UUID_A}', '2024-01-01 00:00:00', '2023-12-31 00:00:00', 5, 7, 'd41d8cd98f00b204e9800998ecf8427e', node_reference_id \
         FROM node_reference"
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(UUID_A), b"12345").unwrap();
    let mut config = CacheConfig::new(dir.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = glance.root();
    config
        .driver_options
        .push(("worker_self_reference_url".into(), "http://us:9292".into()));
    let cache = ImageCache::with_runtime(runtime(), config).unwrap();
    let images = cache.get_cached_images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].hits, 7);
    assert_eq!(images[0].last_accessed, 1_704_067_200.0);
    assert_eq!(images[0].last_modified, 1_703_980_800.0);
    assert_eq!(
        cache.get_cached_nodes(UUID_A).unwrap(),
        ["http://glance-api:9292", "http://us:9292"]
    );
    // What this driver writes, Glance reads: naive UTC, hits, md5 hex.
    let md5: image_cache::Checksum = "md5:5d41402abc4b2a76b9719d911017c592".parse().unwrap();
    cache
        .cache_reader(UUID_B, Some(&md5), &b"hello"[..])
        .unwrap();
    let row = glance.sql(&format!(
        "SELECT hits, size, checksum, \
           abs(extract(epoch FROM (now() AT TIME ZONE 'UTC') - last_modified)) < 60 \
         FROM cached_images WHERE image_id = '{UUID_B}'"
    ));
    assert_eq!(row, "0|5|5d41402abc4b2a76b9719d911017c592|t");
    assert_eq!(
        schema_of(&glance),
        before,
        "the driver changed Glance's tables"
    );

    // A database without the tables: the driver refuses, naming Glance's
    // migrations, and creates nothing (its role may not anyway).
    let bare = cluster.bare_database();
    let other = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(other.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = bare.root();
    config.driver_options.push((
        "worker_self_reference_url".into(),
        "http://fresh:9292".into(),
    ));
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(
        message.contains("glance-manage db sync") && message.contains("image-cache db init"),
        "{message}"
    );
    assert_eq!(schema_of(&bare), "");
    // `image-cache db init` (an administrator's URL) makes exactly Glance's.
    if let Some(admin) = &bare.superuser_url {
        image_cache::database::postgres::init_schema(admin, Duration::from_secs(30)).unwrap();
        image_cache::database::postgres::init_schema(admin, Duration::from_secs(30))
            .expect("idempotent");
        assert_eq!(schema_of(&bare), before);
    }
}

#[test]
fn a_node_without_worker_self_reference_url_is_a_bad_configuration() {
    let pg = PgSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = pg.databases.clone();
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(message.contains("worker_self_reference_url"), "{message}");
}

#[test]
fn an_unreachable_database_is_an_error_that_never_shows_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql+psycopg2://glance:{PASSWORD}@127.0.0.1:{port}/glance");
    let dir = tempfile::tempdir().unwrap();
    let config = |fallback: bool| {
        let mut c = CacheConfig::new(dir.path())
            .driver(CENTRALIZED)
            .fallback_to_sqlite(fallback);
        c.databases = std::sync::Arc::new(
            image_cache::database::DatabaseRoot::new()
                .with_database(CENTRALIZED_DATABASE, &DatabaseSettings::new(url.clone()))
                .unwrap(),
        );
        c.driver_options
            .push(("worker_self_reference_url".into(), "http://n:9292".into()));
        c
    };
    // Down is not a configuration to fix: a database error, which says
    // which database and never the password or the address.
    let message = match ImageCache::with_runtime(runtime(), config(false)) {
        Err(Error::Database(m)) => m,
        Err(e) => panic!("expected a database error, got {e:?}"),
        Ok(_) => panic!("opened without its database"),
    };
    assert!(
        message.contains("\"glance\"") && message.contains("cannot be reached"),
        "{message}"
    );
    assert!(!message.contains(PASSWORD), "{message}");
    assert!(!message.contains(&port.to_string()), "{message}");
    // A server may start without it: the calls fail the same way.
    let mut server = config(false);
    server.start_while_database_down = true;
    let cache = ImageCache::with_runtime(runtime(), server).unwrap();
    assert_eq!(cache.driver().name(), "centralized");
    match cache.get_cache_size() {
        Err(Error::Database(m)) => assert!(!m.contains(PASSWORD), "{m}"),
        other => panic!("expected a database error, got {other:?}"),
    }
    // No fallback to sqlite for an outage, even when fallback is on.
    assert!(matches!(
        ImageCache::with_runtime(runtime(), config(true)),
        Err(Error::Database(_))
    ));
    // No database configured at all.
    let mut none = CacheConfig::new(dir.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    none.driver_options
        .push(("worker_self_reference_url".into(), "http://n:9292".into()));
    let message = bad_configuration(ImageCache::with_runtime(runtime(), none));
    assert!(message.contains("image_cache_database_url"), "{message}");
}

#[test]
fn a_superuser_role_is_refused_unless_allowed() {
    let (_use, cluster) = pg::postgres();
    let db = cluster.database();
    let Some(superuser) = db.superuser_url.clone() else {
        return; // an external server: its admin is not ours to hand out
    };
    let dir = tempfile::tempdir().unwrap();
    let open = |allow: bool| {
        let mut settings = DatabaseSettings::new(superuser.clone());
        settings.allow_privileged_role = allow;
        let mut c = CacheConfig::new(dir.path())
            .driver(CENTRALIZED)
            .fallback_to_sqlite(false);
        c.databases = db.root_with(settings);
        c.driver_options
            .push(("worker_self_reference_url".into(), "http://n:9292".into()));
        ImageCache::with_runtime(runtime(), c)
    };
    let message = bad_configuration(open(false));
    assert!(message.contains("superuser"), "{message}");
    assert!(
        message.contains("GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference"),
        "{message}"
    );
    assert!(!message.contains(PASSWORD), "{message}");
    open(true).unwrap();

    // A role that may run server programs is refused as well.
    db.sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runner') THEN \
         CREATE ROLE runner LOGIN PASSWORD 'runner-pw'; END IF; END $$; \
         GRANT pg_execute_server_program TO runner",
    );
    db.grant_cache_privileges("runner");
    let root = db.root_with(DatabaseSettings::new(
        db.url
            .replace(&format!("glance:{PASSWORD}"), "runner:runner-pw"),
    ));
    let e = root.open(CENTRALIZED_DATABASE, soon()).err().unwrap();
    assert_eq!(e.code, ErrorCode::AccessDenied, "{}", e.message);
    assert!(
        e.message.contains("pg_execute_server_program"),
        "{}",
        e.message
    );
}

fn soon() -> Deadline {
    Deadline(Instant::now() + Duration::from_secs(10))
}

fn within(d: Duration) -> Deadline {
    Deadline(Instant::now() + d)
}

#[test]
fn losing_the_database_mid_run_fails_calls_and_recovers_when_it_is_back() {
    let (_alone, cluster) = pg::postgres_alone();
    let db = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let cache = node_with_short_deadline(dir.path(), db.root(), "http://n:9292");
    put(&cache, "kept", &image_bytes(1, 2000));
    get(&cache, "kept");

    cluster.stop();
    let started = Instant::now();
    let e = cache
        .cache_reader("new", None, &image_bytes(2, 2000)[..])
        .unwrap_err();
    // The commit could not record the image: the write is aborted.
    assert!(matches!(e, Error::Io { .. } | Error::Database(_)), "{e:?}");
    assert!(e.to_string().contains("glance"), "{e}");
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(cache.get_cached_images(), Err(Error::Database(_))));
    let mut out = Vec::new();
    assert!(
        cache.read_image("kept", &mut out).is_err(),
        "the hit cannot be counted"
    );
    // No image file lost, none half-published.
    assert!(dir.path().join("kept").exists());
    assert!(!dir.path().join("new").exists());
    assert!(!dir.path().join("incomplete").join("new").exists());
    assert!(cache.is_cached("kept").unwrap());

    cluster.start();
    // Back by itself: the pool drops the dead connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cache.get_cached_images() {
            Ok(images) => {
                assert_eq!(images.len(), 1);
                assert_eq!(images[0].hits, 1);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the driver did not recover: {e}"),
        }
    }
    put(&cache, "new", &image_bytes(2, 2000));
    get(&cache, "kept");
    assert_eq!(cache.get_hit_count("kept").unwrap(), 2);
    assert_eq!(cached_ids(&cache), ["kept", "new"]);

    // A server that stops answering (frozen, not gone): the call still
    // ends by its deadline.
    let frozen = Frozen::server(&cluster_pid(&db));
    let started = Instant::now();
    let e = cache.get_cached_images().unwrap_err();
    let took = started.elapsed();
    drop(frozen);
    assert!(took < Duration::from_secs(5), "took {took:?}: {e}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cache.get_cached_images().is_err() {
        assert!(Instant::now() < deadline, "no recovery after the freeze");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The postmaster's pid of the cluster serving `db` (our own cluster).
fn cluster_pid(db: &TestDatabase) -> String {
    db.sql("SELECT pg_backend_pid()"); // proves the server is up
    let dir = db.sql("SHOW data_directory");
    std::fs::read_to_string(std::path::Path::new(&dir).join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

/// The server's processes stopped with SIGSTOP until dropped.
struct Frozen(Vec<i32>);

impl Frozen {
    fn server(postmaster: &str) -> Frozen {
        let postmaster: i32 = postmaster.trim().parse().unwrap();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        for &pid in &pids {
            // SAFETY: signals to the server processes this test started.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

#[test]
fn hot_swap_sqlite_to_centralized_and_back_on_a_live_root() {
    let pg = PgSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path())
        .driver(SQLITE)
        .fallback_to_sqlite(false);
    pg.configure(&mut config);
    let cache = ImageCache::with_runtime(runtime(), config).unwrap();
    put(&cache, UUID_A, &image_bytes(1, 100));
    get(&cache, UUID_A);
    get(&cache, UUID_A);
    assert_eq!(cache.get_hit_count(UUID_A).unwrap(), 2);
    // A write in flight across the swap.
    let mut writer = cache.open_for_write("in-flight").unwrap();
    std::io::Write::write_all(&mut writer, b"half").unwrap();

    cache.swap_driver(&CENTRALIZED).unwrap();
    assert_eq!(cache.driver().name(), "centralized");
    // The file carries over; the sqlite hits stay in cache.db.
    assert_eq!(cached_ids(&cache), [UUID_A]);
    assert_eq!(cache.get_hit_count(UUID_A).unwrap(), 0);
    std::io::Write::write_all(&mut writer, b" and the rest").unwrap();
    writer.commit(None).unwrap();
    put(&cache, UUID_B, &image_bytes(2, 200));
    get(&cache, UUID_B);
    get(&cache, UUID_A);
    assert_eq!(cache.get_hit_count(UUID_A).unwrap(), 1);
    assert_eq!(
        cache.get_cached_nodes(UUID_B).unwrap(),
        std::slice::from_ref(&pg.node)
    );
    assert_eq!(
        cache.get_cached_nodes(UUID_A).unwrap(),
        std::slice::from_ref(&pg.node)
    );
    assert_eq!(cached_ids(&cache), [UUID_B, UUID_A, "in-flight"]);

    cache.swap_driver(&SQLITE).unwrap();
    assert_eq!(cached_ids(&cache), [UUID_B, UUID_A, "in-flight"]);
    assert_eq!(cache.get_hit_count(UUID_A).unwrap(), 2);
    assert_eq!(get(&cache, UUID_B), image_bytes(2, 200));
    assert!(matches!(
        cache.get_cached_nodes(UUID_A),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn rows_and_files_are_reconciled() {
    let pg = PgSetup::new();
    let t_dir = tempfile::tempdir().unwrap();
    let cache = node(t_dir.path(), &pg, &pg.node);
    put(&cache, "a", b"aaaa");
    put(&cache, "b", b"bb");
    // A file without a row: listed with no hits; its first read makes one.
    std::fs::write(t_dir.path().join("copied-in"), b"xyz").unwrap();
    // A row without a file (wiped by hand): not listed, not a node of it.
    std::fs::remove_file(t_dir.path().join("b")).unwrap();
    assert_eq!(cached_ids(&cache), ["a", "copied-in"]);
    // `nodes` is Glance's: the rows, whichever node is asked. "b" still
    // has its row (clean drops it below); "copied-in" has none until read.
    assert_eq!(
        cache.get_cached_nodes("b").unwrap(),
        std::slice::from_ref(&pg.node)
    );
    assert!(cache.get_cached_nodes("copied-in").unwrap().is_empty());
    get(&cache, "copied-in");
    assert_eq!(cache.get_hit_count("copied-in").unwrap(), 1);
    assert_eq!(
        cache.get_cached_nodes("copied-in").unwrap(),
        std::slice::from_ref(&pg.node)
    );
    // Cached again over its old row (the file removed by hand): the row
    // keeps its hits, as Glance ignores the duplicate, and takes the new
    // size.
    std::fs::remove_file(t_dir.path().join("copied-in")).unwrap();
    put(&cache, "copied-in", b"wxyz");
    assert_eq!(cache.get_hit_count("copied-in").unwrap(), 1);
    assert_eq!(
        pg.db
            .sql("SELECT size FROM cached_images WHERE image_id = 'copied-in'"),
        "4"
    );
    // clean drops rows whose files are gone (once they are settled).
    pg.db
        .sql("UPDATE cached_images SET last_modified = last_modified - interval '1 hour'");
    cache.clean(Duration::from_secs(86_400)).unwrap();
    assert_eq!(
        pg.db
            .sql("SELECT string_agg(image_id, ',' ORDER BY image_id) FROM cached_images"),
        "a,copied-in"
    );
    // Ids longer than Glance's VARCHAR(36) are cached without a row.
    let long = "l".repeat(100);
    put(&cache, &long, b"long");
    assert_eq!(get(&cache, &long), b"long");
    assert_eq!(cache.get_hit_count(&long).unwrap(), 0);
    assert!(cache.get_cached_nodes(&long).unwrap().is_empty());
}

// The database import under attack: what a driver's SQL may reach.

/// A database whose role may create tables (owned by it), with that
/// allowed: the statement checks, the second layer, are tried on their own.
fn attack_db() -> (
    TestDatabase,
    std::sync::Arc<image_cache::database::DatabaseRoot>,
) {
    let (_use, cluster) = pg::postgres();
    let db = cluster.owned_database();
    let root = db.privileged_root();
    (db, root)
}

#[test]
fn sql_that_reaches_beyond_the_tables_is_refused() {
    let (pg, root) = attack_db();
    let canary = tempfile::tempdir().unwrap();
    let target = canary.path().join("pwned");
    let target = target.display();
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    c.execute("CREATE TABLE t (s TEXT)", vec![], soon())
        .unwrap();
    for sql in [
        format!("COPY t TO '{target}'"),
        format!("COPY (SELECT 1) TO PROGRAM 'touch {target}'"),
        "SELECT pg_read_file('/etc/passwd')".to_string(),
        "SELECT lo_import('/etc/passwd')".to_string(),
        format!("SELECT lo_export(1, '{target}')"),
        "SELECT dblink('host=127.0.0.1', 'select 1')".to_string(),
        "SET ROLE postgres".to_string(),
        "SET statement_timeout = 0".to_string(),
        "ALTER SYSTEM SET archive_command = 'touch /tmp/x'".to_string(),
        "SELECT inet_server_addr()".to_string(),
        "SELECT current_setting('port')".to_string(),
        "SELECT current_user".to_string(),
        "SELECT * FROM pg_stat_activity".to_string(),
        "SELECT query_to_xml('select 1', true, true, '')".to_string(),
        "SELECT 1; DROP TABLE t".to_string(),
        "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql".to_string(),
        "DO $$ BEGIN END $$".to_string(),
    ] {
        let e = c.query(&sql, vec![], soon()).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessDenied, "{sql}: {}", e.message);
    }
    assert!(!canary.path().join("pwned").exists());
    // The table is still there and the connection still works.
    c.execute(
        "INSERT INTO t VALUES ($1)",
        vec![Value::Text("ok".into())],
        soon(),
    )
    .unwrap();
    drop(pg);
}

#[test]
fn parameters_must_fit_the_servers_types() {
    let (_pg, root) = attack_db();
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    c.execute(
        "CREATE TABLE t (i INTEGER, b BIGINT, f DOUBLE PRECISION, s VARCHAR(4), x BYTEA, at TIMESTAMP, ok BOOLEAN)",
        vec![],
        soon(),
    )
    .unwrap();
    let insert = "INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6, $7)";
    let good = vec![
        Value::Integer(7),
        Value::Integer(1 << 40),
        Value::Integer(3),
        Value::Text("abcd".into()),
        Value::Blob(vec![0, 1, 2]),
        Value::Real(1_700_000_000.25),
        Value::Boolean(true),
    ];
    assert_eq!(c.execute(insert, good.clone(), soon()).unwrap(), 1);
    for (i, bad) in [
        (0, Value::Integer(1 << 40)),
        (0, Value::Text("7".into())),
        (1, Value::Real(1.5)),
        (4, Value::Text("x".into())),
        (5, Value::Real(f64::INFINITY)),
        (6, Value::Integer(1)),
    ] {
        let mut values = good.clone();
        values[i] = bad;
        let e = c.execute(insert, values, soon()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Other, "{}", e.message);
        assert!(e.message.contains(&format!("${}", i + 1)), "{}", e.message);
    }
    // Too long for VARCHAR(4): the server says so.
    let mut values = good.clone();
    values[3] = Value::Text("abcde".into());
    assert!(c.execute(insert, values, soon()).is_err());
    let rows = c.query("SELECT * FROM t", vec![], soon()).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(matches!(rows[0][1], Value::Integer(i) if i == 1 << 40));
    assert!(matches!(rows[0][5], Value::Real(t) if t == 1_700_000_000.25));
    assert!(matches!(rows[0][6], Value::Boolean(true)));
    let e = c.execute(insert, vec![Value::Null], soon()).unwrap_err();
    assert!(e.message.contains("7 parameters"), "{}", e.message);
}

#[test]
fn results_time_and_connections_are_bounded() {
    let (db, _) = attack_db();
    let mut settings = DatabaseSettings::new(db.url.clone());
    settings.max_result_bytes = 10_000;
    settings.pool_size = 2;
    settings.allow_privileged_role = true;
    let root = db.root_with(settings);
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let e = c
        .query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 100)",
            vec![],
            soon(),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded, "{}", e.message);

    // A statement that runs past the deadline is stopped there, and on the
    // server too.
    let started = Instant::now();
    let e = c
        .query(
            "SELECT count(*) FROM generate_series(1, 10000000000)",
            vec![],
            within(Duration::from_millis(500)),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TimedOut, "{}", e.message);
    assert!(started.elapsed() < Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%generate_series(1, 10000000000)%' \
         AND state = 'active' AND pid <> pg_backend_pid()",
    ) != "0"
    {
        assert!(Instant::now() < deadline, "the query still runs on the server");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(c);

    // The pool's size bounds the connections: a third waits, then gives up
    // at its deadline.
    let a = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let b = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let started = Instant::now();
    let e = root
        .open(CENTRALIZED_DATABASE, within(Duration::from_millis(300)))
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::TimedOut, "{}", e.message);
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(a);
    root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    drop(b);
}

#[test]
fn a_transaction_left_open_is_rolled_back_not_handed_on() {
    let (_pg, root) = attack_db();
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    c.execute("CREATE TABLE t (i INTEGER)", vec![], soon())
        .unwrap();
    c.execute("BEGIN", vec![], soon()).unwrap();
    c.execute("INSERT INTO t VALUES (1)", vec![], soon())
        .unwrap();
    drop(c);
    let mut d = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let rows = d.query("SELECT count(*) FROM t", vec![], soon()).unwrap();
    assert!(matches!(rows[0][0], Value::Integer(0)));
    // Not inside the abandoned transaction: this commits by itself.
    d.execute("INSERT INTO t VALUES (2)", vec![], soon())
        .unwrap();
    let mut e = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let rows = e.query("SELECT count(*) FROM t", vec![], soon()).unwrap();
    assert!(matches!(rows[0][0], Value::Integer(1)));
}

#[test]
fn errors_never_show_the_password_or_the_host() {
    let (pg, root) = attack_db();
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    for sql in [
        "SELECT * FROM no_such_table",
        "SELECT 'Pw-9f3c2e-s3cr3t'::int",
        "INSERT INTO nowhere VALUES (1)",
    ] {
        let e = c.query(sql, vec![], soon()).unwrap_err();
        assert!(!e.message.contains(PASSWORD), "{}", e.message);
        assert!(!e.message.contains("127.0.0.1"), "{}", e.message);
    }
    let e = root.open("not-configured", soon()).err().unwrap();
    assert_eq!(e.code, ErrorCode::AccessDenied);
    drop(pg);
}

#[test]
fn the_cli_lists_the_nodes_of_an_image() {
    let pg = PgSetup::new();
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |dir: &std::path::Path, node: &str, args: &[&str]| {
        let out = std::process::Command::new(cli_binary())
            .arg("--dir")
            .arg(dir)
            .args(["--driver", "centralized_db", "--no-fallback"])
            .args(["--worker-self-reference-url", node])
            .env("IMAGE_CACHE_DATABASE_URL", &pg.db.url)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));
        (out.status.success(), stdout, stderr)
    };
    let src = one.path().join("src");
    std::fs::write(&src, b"image").unwrap();
    let src = src.display().to_string();
    assert!(
        run(
            one.path(),
            "http://one:9292",
            &["cache", UUID_A, "--from", &src]
        )
        .0
    );
    assert!(
        run(
            two.path(),
            "http://two:9292",
            &["cache", UUID_A, "--from", &src]
        )
        .0
    );
    let (ok, stdout, stderr) = run(one.path(), "http://one:9292", &["nodes", UUID_A]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "http://one:9292\nhttp://two:9292\n");
    let (ok, stdout, _) = run(two.path(), "http://two:9292", &["--json", "nodes", UUID_A]);
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["nodes"][1], "http://two:9292");
    // --help with the URL in the environment does not print it.
    let (_, help, _) = run(one.path(), "http://one:9292", &["--help"]);
    assert!(help.contains("--database-url"));
    // No node name: the error says which option.
    let out = std::process::Command::new(cli_binary())
        .arg("--dir")
        .arg(one.path())
        .args(["--driver", "centralized", "--no-fallback", "nodes", UUID_A])
        .env("IMAGE_CACHE_DATABASE_URL", &pg.db.url)
        .env_remove("IMAGE_CACHE_WORKER_SELF_REFERENCE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker_self_reference_url"));
}

/// The database fences the driver by its own privileges: a role with
/// anything beyond DML on the two cache tables is refused at connect, and
/// the refusal carries the SQL that makes a dedicated role.
#[test]
fn a_role_with_more_than_the_cache_tables_is_refused_with_the_grants_to_run() {
    let (_use, cluster) = pg::postgres();
    let db = cluster.database();
    db.sql("CREATE TABLE image_locations (image_id TEXT, value TEXT)");
    let refusal = |db: &TestDatabase| -> Option<String> {
        db.root().open(CENTRALIZED_DATABASE, soon()).err().map(|e| {
            assert_eq!(e.code, ErrorCode::AccessDenied, "{}", e.message);
            e.message
        })
    };
    assert_eq!(refusal(&db), None, "the fenced role is accepted");
    for (grant, revoke, expected) in [
        (
            "GRANT SELECT ON image_locations TO glance",
            "REVOKE SELECT ON image_locations FROM glance",
            "SELECT on image_locations",
        ),
        (
            "GRANT TRUNCATE, TRIGGER ON cached_images TO glance",
            "REVOKE TRUNCATE, TRIGGER ON cached_images FROM glance",
            "TRIGGER on cached_images",
        ),
        (
            "GRANT CREATE ON SCHEMA public TO glance",
            "REVOKE CREATE ON SCHEMA public FROM glance",
            "may create objects in schema public",
        ),
        (
            &format!("GRANT CREATE ON DATABASE {} TO glance", db.name),
            &format!("REVOKE CREATE ON DATABASE {} FROM glance", db.name),
            "may create schemas in the database",
        ),
        (
            "ALTER TABLE image_locations OWNER TO glance",
            "ALTER TABLE image_locations OWNER TO postgres",
            "owns relation image_locations",
        ),
        (
            "GRANT SELECT (value) ON image_locations TO glance",
            "REVOKE SELECT (value) ON image_locations FROM glance",
            "SELECT on image_locations",
        ),
    ] {
        db.sql(grant);
        let message = refusal(&db).unwrap_or_else(|| panic!("{grant}: accepted"));
        assert!(message.contains(expected), "{grant}: {message}");
        assert!(
            message.contains("GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference TO image_cache")
                && message.contains("GRANT USAGE ON SEQUENCE"),
            "{message}"
        );
        assert!(!message.contains(PASSWORD), "{message}");
        db.sql(revoke);
        assert_eq!(refusal(&db), None, "{revoke}: accepted again");
    }
    // A role it may become with powers of its own (its own role here, not
    // the shared test role: role memberships are cluster-wide).
    db.sql(
        "DO $$ BEGIN \
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'member_test') THEN \
             CREATE ROLE member_test LOGIN PASSWORD 'member-pw'; END IF; \
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mighty_test') THEN \
             CREATE ROLE mighty_test CREATEDB; END IF; END $$; \
         GRANT mighty_test TO member_test",
    );
    db.grant_cache_privileges("member_test");
    let member = db.root_with(DatabaseSettings::new(
        db.url
            .replace(&format!("glance:{PASSWORD}"), "member_test:member-pw"),
    ));
    let e = member
        .open(CENTRALIZED_DATABASE, soon())
        .err()
        .expect("refused");
    assert!(e.message.contains("mighty_test"), "{}", e.message);
    // Glance's own role (the owner of its database and tables) is refused.
    let owned = cluster.owned_database();
    let message = refusal(&owned).expect("the owner role is refused");
    assert!(message.contains("owns database"), "{message}");
}

/// A transaction a driver leaves open when its call returns is rolled back
/// then: a lock it took cannot keep other nodes (or Glance) out between
/// calls. (The host ends every export call this way; here the mechanism is
/// driven directly, as the host's call wrapper does.)
#[test]
fn a_transaction_open_when_the_call_returns_is_rolled_back() {
    use image_cache::bindings::database::HostConnection;
    use image_cache::database::{DatabaseView, OpenTransactions};
    use wasmtime::component::{Resource, ResourceTable};
    let pg = PgSetup::new();
    let mut table = ResourceTable::new();
    let mut connections = 0;
    let mut transactions = OpenTransactions::default();
    // The view a store lends the `database` host functions during a call.
    fn view<'a>(
        databases: &'a image_cache::database::DatabaseRoot,
        table: &'a mut ResourceTable,
        connections: &'a mut usize,
        transactions: &'a mut OpenTransactions,
    ) -> DatabaseView<'a> {
        DatabaseView {
            databases,
            table,
            deadline: soon(),
            connections,
            max_connections: 4,
            transactions,
        }
    }
    let mut call = view(
        &pg.databases,
        &mut table,
        &mut connections,
        &mut transactions,
    );
    let c = call.open(CENTRALIZED_DATABASE.into()).unwrap().unwrap();
    let again = || Resource::<image_cache::database::Connection>::new_borrow(c.rep());
    call.execute(again(), "BEGIN".into(), vec![])
        .unwrap()
        .unwrap();
    call.execute(
        again(),
        "LOCK TABLE cached_images IN ACCESS EXCLUSIVE MODE".into(),
        vec![],
    )
    .unwrap()
    .unwrap();
    // While the call runs, the lock holds.
    let blocked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pg.db
            .sql("SET lock_timeout = '200ms'; SELECT count(*) FROM cached_images")
    }))
    .is_err();
    assert!(blocked, "the lock is held inside the call");
    // The call returns: rolled back, the lock gone, the connection usable.
    transactions.end_call(&mut table);
    assert_eq!(
        pg.db
            .sql("SET lock_timeout = '2s'; SELECT count(*) FROM cached_images"),
        "0"
    );
    let rows = view(
        &pg.databases,
        &mut table,
        &mut connections,
        &mut transactions,
    )
    .query(
        again(),
        "SELECT count(*)::bigint FROM cached_images".into(),
        vec![],
    )
    .unwrap()
    .unwrap();
    assert!(
        matches!(rows.as_slice(), [row] if matches!(row.as_slice(), [Value::Integer(0)])),
        "{rows:?}"
    );
}

/// One GET over a fresh connection: status, body, whether the body came
/// whole (Content-Length bytes).
fn http_get(addr: &str, path: &str) -> (u16, Vec<u8>, bool, String) {
    http_get_with(addr, path, "")
}

fn http_get_with(addr: &str, path: &str, headers: &str) -> (u16, Vec<u8>, bool, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw[end + 4..].to_vec();
    let length: Option<usize> = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok());
    let complete = length.is_none_or(|n| n == body.len());
    (status, body, complete, head)
}

/// A server process, killed when dropped (a failing test leaves none
/// behind).
struct Running(std::process::Child);

impl Running {
    fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `image-cache serve` with the centralized driver on a test database.
fn serve_centralized(
    root: &std::path::Path,
    upstream: &std::path::Path,
    url: &str,
) -> (Running, String) {
    serve_centralized_with(root, upstream, url, &[])
}

fn serve_centralized_with(
    root: &std::path::Path,
    upstream: &std::path::Path,
    url: &str,
    extra: &[&str],
) -> (Running, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(cli_binary())
        .arg("--dir")
        .arg(root)
        .args(["--driver", "centralized_db", "--no-fallback"])
        .args(["--worker-self-reference-url", "http://node-1:9292"])
        .env("IMAGE_CACHE_DATABASE_URL", url)
        .env("IMAGE_CACHE_ADMIN_TOKEN", "admin-token-0123456789abcdef")
        .args(extra)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-downloads",
            "--upstream",
        ])
        .arg(upstream)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("image-cache serve: listening on http://") {
            return (Running(child), a.to_string());
        }
    }
    let status = child.wait();
    panic!(
        "the server did not start: {status:?}\n{}",
        log.join().unwrap_or_default()
    );
}

#[test]
fn serve_keeps_serving_cached_images_while_the_database_is_down() {
    let (_alone, cluster) = pg::postgres_alone();
    let db = cluster.database();
    serve_through_an_outage(&db.url, || cluster.stop(), || cluster.start());
}

/// A cached image is this image by its seal: with the database at `url`
/// down (`stop`; and after a restart with it down) it is served, without
/// a checksum, and /healthz says degraded; the driver answers again once
/// the database is back (`start`).
fn serve_through_an_outage(url: &str, stop: impl Fn(), start: impl Fn()) {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let bytes = image_bytes(9, 3 << 20);
    std::fs::write(store.path().join("img"), &bytes).unwrap();
    let root = dir.path().join("cache");
    let (mut server, addr) = serve_centralized(&root, store.path(), url);
    let (status, body, complete, _) = http_get(&addr, "/v2/images/img/file");
    assert!(status == 200 && complete && body == bytes);
    let until = Instant::now() + Duration::from_secs(20);
    while !root.join("img").exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, health, _, _) = http_get(&addr, "/healthz");
    assert!(String::from_utf8_lossy(&health).contains("\"ok\""));
    // Glance's shape: a bare list of the nodes' URLs.
    let (status, nodes, _, _) = http_get_with(
        &addr,
        "/v2/cache/nodes/img",
        "X-Auth-Token: admin-token-0123456789abcdef\r\n",
    );
    assert_eq!(status, 200);
    let nodes: serde_json::Value = serde_json::from_slice(&nodes).unwrap();
    assert_eq!(nodes, serde_json::json!(["http://node-1:9292"]));

    stop();
    let down = |addr: &str| {
        let (status, body, complete, head) = http_get(addr, "/v2/images/img/file");
        assert_eq!(status, 200, "{head}");
        assert!(complete && body == bytes, "served whole from the cache");
        assert!(!head.to_ascii_lowercase().contains("content-md5"), "{head}");
        let (status, health, _, _) = http_get(addr, "/healthz");
        let health = String::from_utf8_lossy(&health).to_string();
        assert_eq!(status, 200);
        assert!(health.contains("\"degraded\""), "{health}");
        // Management needs the database: 503, try again.
        let (status, _, _, head) = http_get_with(
            addr,
            "/v2/cache",
            "X-Auth-Token: admin-token-0123456789abcdef\r\n",
        );
        assert_eq!(status, 503, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 5"),
            "{head}"
        );
    };
    down(&addr);
    // The CLI opened while the database is down says why and fails with
    // the database's exit code; it does not fall back to sqlite (which
    // would prune files whose shared rows stay).
    let out = std::process::Command::new(cli_binary())
        .arg("--dir")
        .arg(&root)
        .args(["--driver", "centralized_db"])
        .args(["--worker-self-reference-url", "http://node-1:9292"])
        .env("IMAGE_CACHE_DATABASE_URL", url)
        .arg("list-cached")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be reached"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
    // A server started while it is down starts, and serves the same way.
    let _ = server.kill();
    let _ = server.wait();
    let (mut server, addr) = serve_centralized(&root, store.path(), url);
    down(&addr);

    start();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, health, _, _) = http_get(&addr, "/healthz");
        if String::from_utf8_lossy(&health).contains("\"ok\"") {
            break;
        }
        assert!(Instant::now() < until, "no recovery");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _, complete, head) = http_get(&addr, "/v2/images/img/file");
    assert!(status == 200 && complete, "{head}");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn prune_with_a_locked_row_loses_no_bookkeeping() {
    // Rows, then files, a batch of 100 at a time: a row another session
    // holds locked (in the second batch) stops the prune at its deadline
    // with the first batch gone (rows and files) and everything else
    // still cached, rows and files agreeing.
    let pg = PgSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let cache = node_with_short_deadline(dir.path(), pg.databases.clone(), &pg.node);
    for i in 0..250 {
        put(&cache, &format!("p-{i:03}"), b"x");
        // Distinct access times: LRU order is the order of caching.
        std::thread::sleep(Duration::from_millis(2));
    }
    let db = pg.db.name.clone();
    let locker = std::thread::spawn({
        let sql = "BEGIN; SELECT 1 FROM cached_images WHERE image_id = 'p-150' FOR UPDATE; \
                   SELECT pg_sleep(8); COMMIT;";
        let cluster = pg::Cluster::shared();
        move || cluster.admin_sql(&db, sql)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let result = cache.prune(0);
    locker.join().unwrap();
    if let Ok(report) = &result {
        assert_eq!(report.removed.len(), 100, "{:?}", report.failures);
        assert!(!report.failures.is_empty());
    }
    let files: Vec<String> = image_cache_tests::files_in(dir.path())
        .into_iter()
        .filter(|f| f.starts_with("p-"))
        .collect();
    let listed = cached_ids(&cache);
    assert_eq!(files.len(), 150, "{result:?}");
    assert_eq!(listed, files, "rows and files agree");
    let rows = pg.db.sql("SELECT count(*) FROM cached_images");
    assert_eq!(rows, "150");
    assert!(files.first().is_some_and(|f| f == "p-100"));
}

#[test]
fn the_pool_size_bounds_a_servers_connections() {
    // 16 clients at once, each call reaching the database: the server
    // holds at most --database-pool-size connections.
    let pg = PgSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let (mut server, addr) = serve_centralized_with(
        &root,
        store.path(),
        &pg.db.url,
        &["--database-pool-size", "2"],
    );
    let most = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let (most, db) = (most.clone(), pg.db.name.clone());
        let cluster = pg::Cluster::shared();
        std::thread::spawn(move || {
            for _ in 0..40 {
                let n: u64 = cluster
                    .admin_sql(
                        &db,
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND application_name = 'image-cache'",
                    )
                    .parse()
                    .unwrap();
                most.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let (status, body, _, _) = http_get(&addr, "/healthz");
                    assert_eq!(status, 200);
                    assert!(String::from_utf8_lossy(&body).contains("\"ok\""));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    watcher.join().unwrap();
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=2).contains(&most), "{most} connections");
    let _ = server.kill();
    let _ = server.wait();
    // A pool of 0 is a usage error.
    let out = std::process::Command::new(cli_binary())
        .args(["--database-pool-size", "0", "--dir"])
        .arg(dir.path())
        .arg("list-cached")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool size"));
}

#[test]
fn tls_is_required_by_the_server_and_verified_as_libpq_does() {
    // Our cluster refuses TCP without TLS, and its certificate names
    // `localhost` (not 127.0.0.1), signed by the test's own CA.
    let pg = PgSetup::new();
    let Some(ca) = pg::Cluster::shared().tls_ca() else {
        eprintln!("skipped: an external server's TLS is not the tests' to set");
        return;
    };
    let ca = ca.display().to_string();
    let open = |url: String| {
        let root = DatabaseRoot::new()
            .with_database(CENTRALIZED_DATABASE, &DatabaseSettings::new(url))
            .map_err(|e| e.to_string())?;
        root.open(CENTRALIZED_DATABASE, soon())
            .map(|_| ())
            .map_err(|e| e.message)
    };
    let url = pg.db.url.clone();
    let with = |params: &str| {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{params}")
    };
    let localhost = |params: &str| with(params).replace("@127.0.0.1:", "@localhost:");
    // The default (prefer) and require: encrypted, as libpq.
    open(url.clone()).unwrap();
    open(with("sslmode=require")).unwrap();
    // Without TLS the server refuses.
    let e = open(with("sslmode=disable")).unwrap_err();
    assert!(!e.contains(PASSWORD), "{e}");
    // verify-full: the CA and the name must match.
    open(localhost(&format!("sslmode=verify-full&sslrootcert={ca}"))).unwrap();
    let e = open(with(&format!("sslmode=verify-full&sslrootcert={ca}"))).unwrap_err();
    assert!(!e.contains(PASSWORD), "{e}");
    // verify-ca: the CA must match, any name.
    open(with(&format!("sslmode=verify-ca&sslrootcert={ca}"))).unwrap();
    // Another CA: refused, whatever the name.
    let other = tempfile::NamedTempFile::new().unwrap();
    image_cache_tests::tls::unrelated_ca(other.path());
    let wrong = other.path().display().to_string();
    assert!(
        open(localhost(&format!(
            "sslmode=verify-full&sslrootcert={wrong}"
        )))
        .is_err()
    );
    assert!(open(with(&format!("sslmode=verify-ca&sslrootcert={wrong}"))).is_err());
    // require with a root given checks the CA, as libpq.
    assert!(open(with(&format!("sslmode=require&sslrootcert={wrong}"))).is_err());
    // What psycopg2 also accepts: SQLAlchemy's form, client_encoding.
    let sqlalchemy = localhost(&format!(
        "sslmode=verify-full&sslrootcert={ca}&client_encoding=utf8"
    ))
    .replace("postgresql://", "postgresql+psycopg2://");
    open(sqlalchemy).unwrap();
    // A driver works over it.
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = std::sync::Arc::new(
        DatabaseRoot::new()
            .with_database(
                CENTRALIZED_DATABASE,
                &DatabaseSettings::new(localhost(&format!("sslmode=verify-full&sslrootcert={ca}"))),
            )
            .unwrap(),
    );
    config
        .driver_options
        .push(("worker_self_reference_url".into(), "http://tls:9292".into()));
    let cache = ImageCache::with_runtime(runtime(), config).unwrap();
    put(&cache, "over-tls", b"bytes");
    assert_eq!(get(&cache, "over-tls"), b"bytes");
}

#[test]
fn six_nodes_starting_at_once_all_start() {
    // Six first starts at once on a fresh database, five times over (a
    // fresh database each round): every one starts and registers its
    // node once. (Release 0.2 created the tables itself and lost 13 of
    // 30 such starts to "already exists".)
    for round in 0..5 {
        let pg = PgSetup::new();
        let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
        let barrier = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            for (i, d) in dirs.iter().enumerate() {
                let (pg, barrier) = (&pg, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let cache = node(d.path(), pg, &format!("http://node-{i}:9292"));
                    put(&cache, &format!("from-{i}"), b"x");
                });
            }
        });
        assert_eq!(
            pg.db.sql("SELECT count(*) FROM node_reference"),
            "6",
            "round {round}"
        );
        assert_eq!(pg.db.sql("SELECT count(*) FROM cached_images"), "6");
    }
}

/// Release 0.2.0's centralized driver through the contract adapter: it is
/// linked, but it creates Glance's tables itself, and a role fenced as this
/// release asks (no CREATE on the schema) cannot: the database refuses it at
/// configure, with its own words, and nothing falls back.
#[test]
fn a_release_0_2_centralized_driver_is_stopped_by_the_database_fence() {
    let pg = PgSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image_cache_tests::release_config(dir.path(), "0.2.0", "centralized_driver");
    pg.configure(&mut config);
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(
        message.contains("permission denied for schema public"),
        "{message}"
    );
}
