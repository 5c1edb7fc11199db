//! The centralized driver on a real MariaDB (see `support/mariadb.rs`):
//! Glance's tables and semantics on MySQL, the account fence, the
//! statement check as MySQL reads SQL, deadlines that end the server's
//! query, TLS as PyMySQL and mysqlclient mean it, and outages. (The
//! conformance suite runs on it too: `conformance centralized_mariadb::`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use image_cache::bindings::database::{ErrorCode, Value};
use image_cache::database::{CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings};
use image_cache::{CacheConfig, Error, ImageCache};
use image_cache_tests::mariadb::{self, PASSWORD, TestDatabase};
use image_cache_tests::{MariaSetup, bad_configuration, cached_ids, image_bytes, runtime};

use super::{
    CENTRALIZED, UUID_A, UUID_B, get, node_with_short_deadline, put, serve_through_an_outage, soon,
    within,
};

/// A cache on `root` with the centralized driver as node `node` of `db`.
fn node_on(root: &std::path::Path, databases: &Arc<DatabaseRoot>, node: &str) -> ImageCache {
    let mut config = CacheConfig::new(root)
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = databases.clone();
    config
        .driver_options
        .push(("worker_self_reference_url".into(), node.into()));
    ImageCache::with_runtime(runtime(), config).expect("a centralized cache on MariaDB")
}

fn settings(url: &str) -> DatabaseSettings {
    DatabaseSettings::new(url)
}

fn root_of(settings: DatabaseSettings) -> Arc<DatabaseRoot> {
    Arc::new(
        DatabaseRoot::new()
            .with_database(CENTRALIZED_DATABASE, &settings)
            .expect("database settings"),
    )
}

/// The administrator's connection to `db` (every privilege, allowed): for
/// what a fenced account could not even try.
fn privileged_root(db: &TestDatabase) -> Arc<DatabaseRoot> {
    let mut s = settings(&db.admin_url);
    s.allow_privileged_role = true;
    root_of(s)
}

#[test]
fn two_nodes_share_one_mariadb_database_as_glance_does() {
    let m = MariaSetup::new();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_on(a_dir.path(), &m.databases, "http://a:9292");
    let b = node_on(b_dir.path(), &m.databases, "http://b:9292");
    put(&a, UUID_A, &image_bytes(1, 3000));
    assert_eq!(b.get_cached_nodes(UUID_A).unwrap(), ["http://a:9292"]);
    assert!(!b.is_cached(UUID_A).unwrap(), "files are per node");
    put(&b, UUID_A, &image_bytes(1, 3000));
    put(&b, UUID_B, &image_bytes(2, 10));
    get(&a, UUID_A);
    get(&a, UUID_A);
    assert_eq!(a.get_hit_count(UUID_A).unwrap(), 2);
    assert_eq!(b.get_hit_count(UUID_A).unwrap(), 0);
    assert_eq!(
        a.get_cached_nodes(UUID_A).unwrap(),
        ["http://a:9292", "http://b:9292"]
    );
    // Times are naive UTC, as Glance writes them, in whole seconds.
    assert_eq!(
        m.db.sql(&format!(
            "SELECT ABS(TIMESTAMPDIFF(SECOND, last_modified, UTC_TIMESTAMP())) < 60, \
                    size, hits, checksum IS NULL \
             FROM cached_images c JOIN node_reference n USING (node_reference_id) \
             WHERE image_id = '{UUID_A}' AND node_reference_url = 'http://a:9292'"
        )),
        "1\t3000\t2\t1"
    );
    // Prune and delete act on this node's rows only.
    let report = a.prune(0).unwrap();
    assert_eq!(report.removed.len(), 1);
    assert_eq!(b.get_cached_nodes(UUID_A).unwrap(), ["http://b:9292"]);
    assert_eq!(cached_ids(&b), [UUID_B, UUID_A]);
    assert_eq!(b.delete_all_cached_images().unwrap(), 2);
    assert_eq!(m.db.sql("SELECT count(*) FROM cached_images"), "0");
    assert_eq!(m.db.sql("SELECT count(*) FROM node_reference"), "2");
}

#[test]
fn glance_rows_are_read_and_db_init_makes_glances_tables() {
    let (_use, server) = mariadb::mariadb();
    let glance = server.database();
    // Glance's API node cached an image (naive UTC times).
    glance.sql(&format!(
        "INSERT INTO node_reference (node_reference_url) VALUES ('http://glance-api:9292'), ('http://us:9292'); \
         INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
         SELECT '{UUID_A}', '2024-01-01 00:00:00', '2023-12-31 00:00:00', 5, 7, 'd41d8cd98f00b204e9800998ecf8427e', node_reference_id \
         FROM node_reference"
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(UUID_A), b"12345").unwrap();
    let cache = node_on(dir.path(), &glance.root(), "http://us:9292");
    let images = cache.get_cached_images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].hits, 7);
    assert_eq!(images[0].last_accessed, 1_704_067_200.0);
    assert_eq!(images[0].last_modified, 1_703_980_800.0);
    assert_eq!(
        cache.get_cached_nodes(UUID_A).unwrap(),
        ["http://glance-api:9292", "http://us:9292"]
    );
    let md5: image_cache::Checksum = "md5:5d41402abc4b2a76b9719d911017c592".parse().unwrap();
    cache
        .cache_reader(UUID_B, Some(&md5), &b"hello"[..])
        .unwrap();
    assert_eq!(
        glance.sql(&format!(
            "SELECT hits, size, checksum FROM cached_images c \
             JOIN node_reference n USING (node_reference_id) \
             WHERE image_id = '{UUID_B}' AND node_reference_url = 'http://us:9292'"
        )),
        "0\t5\t5d41402abc4b2a76b9719d911017c592"
    );

    // Without the tables: refused, naming Glance's migrations; nothing made.
    // (As the administrator: a fenced account cannot be granted tables
    // that do not exist.)
    let bare = server.bare_database();
    let other = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(other.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = privileged_root(&bare);
    config.driver_options.push((
        "worker_self_reference_url".into(),
        "http://fresh:9292".into(),
    ));
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(
        message.contains("glance-manage db sync") && message.contains("image-cache db init"),
        "{message}"
    );
    let tables = |db: &TestDatabase| {
        db.sql(&format!(
            "SELECT GROUP_CONCAT(CONCAT_WS(' ', table_name, column_name, column_type, \
               is_nullable, IFNULL(column_key, '-'), extra) ORDER BY table_name, column_name \
               SEPARATOR '; ') \
             FROM information_schema.columns WHERE table_schema = '{}'",
            db.name
        ))
    };
    assert_eq!(tables(&bare), "NULL");
    // `image-cache db init`, twice, as an administrator: Glance's tables.
    for _ in 0..2 {
        image_cache::database::init_schema(&bare.admin_url, Duration::from_secs(30)).unwrap();
    }
    assert_eq!(tables(&bare), tables(&glance));
    assert!(tables(&bare).contains("cached_images last_accessed datetime NO"));
}

#[test]
fn an_account_with_more_than_the_cache_tables_is_refused_with_the_grants_to_run() {
    let (_use, server) = mariadb::mariadb();
    let db = server.database();
    db.sql(&format!(
        "GRANT CREATE, DROP ON {}.* TO '{}'@'%'",
        db.name, db.name
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(false);
    config.databases = db.root();
    config
        .driver_options
        .push(("worker_self_reference_url".into(), "http://n:9292".into()));
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(
        message.contains(&format!("holds CREATE on {}.*", db.name))
            && message.contains("image-cache db grants --mysql")
            && message.contains("GRANT SELECT, INSERT, UPDATE, DELETE ON"),
        "{message}"
    );
    assert!(!message.contains(PASSWORD), "{message}");
    // The administrator's account (every privilege, with GRANT OPTION):
    // refused too, unless the operator allows it.
    let e = root_of(settings(&db.admin_url))
        .open(CENTRALIZED_DATABASE, soon())
        .err()
        .expect("refused");
    assert_eq!(e.code, ErrorCode::AccessDenied, "{}", e.message);
    assert!(e.message.contains("on *.*"), "{}", e.message);
    assert!(
        privileged_root(&db)
            .open(CENTRALIZED_DATABASE, soon())
            .is_ok()
    );
}

#[test]
fn mysql_statements_that_reach_beyond_the_tables_are_refused() {
    let (_use, server) = mariadb::mariadb();
    let db = server.database();
    let root = privileged_root(&db);
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    for sql in [
        "SELECT LOAD_FILE('/etc/passwd')",
        "SELECT `load_file`('/etc/passwd')",
        "SELECT 1 INTO OUTFILE '/tmp/image-cache-pwned'",
        "SELECT @@datadir",
        "SELECT @@hostname",
        "SELECT 1 /*!50000 , LOAD_FILE('/etc/passwd') */",
        "SELECT 1 /*M! , @@version */",
        "SELECT 1--1",
        "SELECT 1 # , LOAD_FILE('/etc/passwd')",
        "SELECT * FROM mysql.user",
        "SELECT * FROM information_schema.processlist",
        "SELECT * FROM performance_schema.threads",
        "SELECT CONNECTION_ID()",
        "SELECT UUID()",
        "SELECT DATABASE()",
        "SELECT CURRENT_USER()",
        "SELECT GET_LOCK('x', 1)",
        "SET SESSION max_statement_time = 0",
        "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(1)",
        "SHOW GRANTS",
        "KILL QUERY 1",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE cached_images",
        "SELECT 1; DROP TABLE cached_images",
        "CREATE USER evil",
        "GRANT ALL ON *.* TO evil",
    ] {
        let e = c.query(sql, vec![], soon()).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessDenied, "{sql}: {}", e.message);
    }
    assert!(!std::path::Path::new("/tmp/image-cache-pwned").exists());
    // Strings are read as the check reads them: a backslash escapes
    // nothing (NO_BACKSLASH_ESCAPES), "..." names a column (ANSI_QUOTES).
    let rows = c.query("SELECT 'a\\', 'b'", vec![], soon()).unwrap();
    assert!(
        matches!(&rows[0][0], Value::Text(t) if t == "a\\"),
        "{rows:?}"
    );
    assert_eq!(
        c.query("SELECT \"size\" FROM cached_images", vec![], soon())
            .unwrap()
            .len(),
        0
    );
    // The fenced account: what passes the check, the server refuses.
    let fenced = db.root();
    let mut f = fenced.open(CENTRALIZED_DATABASE, soon()).unwrap();
    for sql in [
        "CREATE TABLE t (a INT)",
        "CREATE INDEX i ON cached_images (size)",
        "LOCK TABLES cached_images WRITE",
    ] {
        let e = f.execute(sql, vec![], soon()).unwrap_err();
        assert_eq!(e.code, ErrorCode::AccessDenied, "{sql}: {}", e.message);
    }
}

#[test]
fn values_and_results_keep_their_types_and_bounds() {
    let (_use, server) = mariadb::mariadb();
    let db = server.database();
    let root = privileged_root(&db);
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let rows = c
        .query(
            "SELECT ?, ?, ?, ?, CAST(? AS BINARY), CAST(1.25 AS DECIMAL(5,2)), \
                    FROM_UNIXTIME(FLOOR(?)), NULL, CAST(18446744073709551615 AS UNSIGNED) < 1",
            vec![
                Value::Integer(i64::MAX),
                Value::Real(0.5),
                Value::Text("é".into()),
                Value::Boolean(true),
                Value::Blob(vec![0, 255]),
                Value::Real(1_704_067_200.9),
            ],
            soon(),
        )
        .unwrap();
    let row = &rows[0];
    assert!(matches!(row[0], Value::Integer(i64::MAX)), "{row:?}");
    assert!(matches!(row[1], Value::Real(r) if r == 0.5), "{row:?}");
    assert!(matches!(&row[2], Value::Text(t) if t == "é"), "{row:?}");
    assert!(matches!(row[3], Value::Integer(1)), "{row:?}");
    assert!(
        matches!(&row[4], Value::Blob(b) if b == &[0, 255]),
        "{row:?}"
    );
    assert!(matches!(row[5], Value::Real(r) if r == 1.25), "{row:?}");
    assert!(
        matches!(row[6], Value::Real(r) if r == 1_704_067_200.0),
        "{row:?}"
    );
    assert!(matches!(row[7], Value::Null), "{row:?}");
    let e = c
        .query(
            "SELECT CAST(18446744073709551615 AS UNSIGNED)",
            vec![],
            soon(),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Other, "{}", e.message);
    let e = c.query("SELECT ?", vec![], soon()).unwrap_err();
    assert!(
        e.message.contains("1 parameters, 0 values"),
        "{}",
        e.message
    );
    let e = c
        .query("SELECT ?", vec![Value::Real(f64::NAN)], soon())
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Other, "{}", e.message);
    // A result over the cap is refused, and the connection goes on.
    let mut small = settings(&db.admin_url);
    small.allow_privileged_role = true;
    small.max_result_bytes = 10_000;
    let root = root_of(small);
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let e = c
        .query("SELECT REPEAT('x', 20000)", vec![], soon())
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::LimitExceeded, "{}", e.message);
    assert_eq!(c.query("SELECT 1", vec![], soon()).unwrap().len(), 1);
    // Constraint violations say so.
    let mut f = db.root().open(CENTRALIZED_DATABASE, soon()).unwrap();
    let e = f
        .execute(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, \
             node_reference_id) VALUES ('x', NOW(), NOW(), 1, 0, 999)",
            vec![],
            soon(),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Constraint, "{}", e.message);
}

#[test]
fn a_statement_past_its_deadline_is_ended_on_the_server() {
    let (_use, server) = mariadb::mariadb();
    let db = server.database();
    let root = privileged_root(&db);
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    let started = Instant::now();
    let e = c
        .query("SELECT SLEEP(30)", vec![], within(Duration::from_secs(1)))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TimedOut, "{}", e.message);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // KILL QUERY ends it on the server, well before its 30 s.
    let sleeping = || {
        server.admin_sql(
            None,
            "SELECT count(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(30)%'",
        )
    };
    let until = Instant::now() + Duration::from_secs(10);
    while sleeping() != "0" {
        assert!(Instant::now() < until, "the query still runs on the server");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The connection that was cut is not handed on: a new one works.
    let mut c = root.open(CENTRALIZED_DATABASE, soon()).unwrap();
    assert_eq!(c.query("SELECT 1", vec![], soon()).unwrap().len(), 1);
    // A transaction left open is rolled back when the connection goes.
    let fenced = db.root();
    let mut f = fenced.open(CENTRALIZED_DATABASE, soon()).unwrap();
    f.execute("BEGIN", vec![], soon()).unwrap();
    f.execute(
        "INSERT INTO node_reference (node_reference_url) VALUES ('http://left-open')",
        vec![],
        soon(),
    )
    .unwrap();
    drop(f);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = db.sql("SELECT count(*) FROM node_reference");
        if rows == "0" {
            break;
        }
        assert!(
            Instant::now() < until,
            "{rows} rows of a dropped transaction"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tls_is_required_by_the_server_and_verified_as_pymysql_does() {
    let (_use, server) = mariadb::mariadb();
    let Some(ca) = server.tls_ca() else {
        eprintln!("skipped: an external MariaDB's TLS is its own");
        return;
    };
    let db = server.database();
    let ca = ca.display().to_string();
    let plain = db.url.replace("?ssl_mode=REQUIRED", "");
    let open = |url: String| root_of(settings(&url)).open(CENTRALIZED_DATABASE, soon());
    // The server takes no plain TCP connection.
    let e = open(plain.clone()).err().expect("plain refused");
    assert_eq!(e.code, ErrorCode::Unavailable, "{}", e.message);
    assert!(!e.message.contains(PASSWORD), "{}", e.message);
    // PyMySQL's ssl_ca verifies the chain and the name: the certificate is
    // for localhost, not 127.0.0.1.
    let e = open(format!("{plain}?ssl_ca={ca}"))
        .err()
        .expect("name check");
    assert_eq!(e.code, ErrorCode::Unavailable, "{}", e.message);
    let by_name = plain.replace("127.0.0.1", "localhost");
    open(format!("{by_name}?ssl_ca={ca}")).expect("verified by name");
    let e = open(format!("{plain}?ssl_mode=VERIFY_IDENTITY&ssl_ca={ca}"))
        .err()
        .expect("VERIFY_IDENTITY checks the name");
    assert_eq!(e.code, ErrorCode::Unavailable, "{}", e.message);
    // Another CA: refused whatever the name.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("ca.crt");
    image_cache_tests::tls::unrelated_ca(&other_ca);
    let e = open(format!("{by_name}?ssl_ca={}", other_ca.display()))
        .err()
        .expect("another CA");
    assert_eq!(e.code, ErrorCode::Unavailable, "{}", e.message);
    // Refused before connecting: PREFERRED (downgradable) and unknown keys.
    for bad in [
        "?ssl_mode=PREFERRED",
        "?sslmode=require",
        "?ssl_mode=VERIFY_CA",
        "?ssl_check_hostname=false&ssl_ca=/ca.pem",
    ] {
        let e = DatabaseRoot::new()
            .with_database(CENTRALIZED_DATABASE, &settings(&format!("{plain}{bad}")))
            .expect_err("refused")
            .to_string();
        assert!(!e.contains(PASSWORD), "{e}");
    }
    // A cache over verified TLS.
    let dir = tempfile::tempdir().unwrap();
    let cache = node_on(
        dir.path(),
        &root_of(settings(&format!("{by_name}?ssl_ca={ca}"))),
        "http://tls:9292",
    );
    put(&cache, UUID_A, b"over tls");
    assert_eq!(get(&cache, UUID_A), b"over tls");
}

#[test]
fn losing_mariadb_mid_run_fails_calls_and_recovers_when_it_is_back() {
    let (_alone, Some(server)) = mariadb::mariadb_alone() else {
        eprintln!("skipped: an external MariaDB is not ours to stop");
        return;
    };
    let db = server.database();
    let dir = tempfile::tempdir().unwrap();
    let cache = node_with_short_deadline(dir.path(), db.root(), "http://n:9292");
    put(&cache, "kept", &image_bytes(1, 2000));
    get(&cache, "kept");
    server.stop();
    let started = Instant::now();
    let e = cache
        .cache_reader("new", None, &image_bytes(2, 2000)[..])
        .unwrap_err();
    assert!(matches!(e, Error::Io { .. } | Error::Database(_)), "{e:?}");
    assert!(!e.to_string().contains(PASSWORD), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(cache.get_cached_images(), Err(Error::Database(_))));
    assert!(cache.is_cached("kept").unwrap());
    assert!(!dir.path().join("new").exists());
    server.start();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match cache.get_cached_images() {
            Ok(images) => {
                assert_eq!(images.len(), 1);
                assert_eq!(images[0].hits, 1);
                break;
            }
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the driver did not recover: {e}"),
        }
    }
    put(&cache, "new", &image_bytes(2, 2000));
    assert_eq!(cached_ids(&cache), ["kept", "new"]);
}

#[test]
fn prune_with_a_locked_mariadb_row_loses_no_bookkeeping() {
    let m = MariaSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let cache = node_with_short_deadline(dir.path(), m.databases.clone(), &m.node);
    for i in 0..250 {
        put(&cache, &format!("p-{i:03}"), b"x");
    }
    // Whole seconds: LRU ties are broken by id, which is caching order.
    let locker = std::thread::spawn({
        let db = m.db.clone();
        move || {
            db.sql(
                "BEGIN; SELECT 1 FROM cached_images WHERE image_id = 'p-150' FOR UPDATE; \
                 SELECT SLEEP(8); COMMIT;",
            )
        }
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
    assert_eq!(files.len(), 150, "{result:?}");
    assert_eq!(cached_ids(&cache), files, "rows and files agree");
    assert_eq!(m.db.sql("SELECT count(*) FROM cached_images"), "150");
    assert!(files.first().is_some_and(|f| f == "p-100"));
}

#[test]
fn six_nodes_starting_at_once_on_mariadb_all_start() {
    let (_use, server) = mariadb::mariadb();
    for round in 0..5 {
        let db = server.database();
        let root = db.root();
        let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = dirs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let root = root.clone();
                    s.spawn(move || {
                        let cache = node_on(d.path(), &root, &format!("http://n{i}:9292"));
                        put(&cache, UUID_A, b"x");
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .unwrap_or_else(|_| panic!("a start failed in round {round}"));
            }
        });
        assert_eq!(db.sql("SELECT count(*) FROM node_reference"), "6");
        assert_eq!(db.sql("SELECT count(*) FROM cached_images"), "6");
    }
}

#[test]
fn a_configured_centralized_driver_never_falls_back_to_sqlite() {
    // An account without its grants: a configuration to fix, said with the
    // grants to give; and no sqlite cache behind it, even with the
    // fallback on (a shared cache on local bookkeeping would prune files
    // whose rows every node still sees).
    let (_use, server) = mariadb::mariadb();
    let db = server.bare_database();
    for table in image_cache::database::mysql::GLANCE_CACHE_SCHEMA {
        db.sql(table);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path())
        .driver(CENTRALIZED)
        .fallback_to_sqlite(true);
    config.databases = db.root();
    config
        .driver_options
        .push(("worker_self_reference_url".into(), "http://n:9292".into()));
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(
        message.contains("ERROR 1044") && message.contains("image-cache db grants"),
        "{message}"
    );
    assert!(!dir.path().join("cache.db").exists(), "no sqlite fallback");
}

#[test]
fn serve_keeps_serving_cached_images_while_mariadb_is_down() {
    let (_alone, Some(server)) = mariadb::mariadb_alone() else {
        eprintln!("skipped: an external MariaDB is not ours to stop");
        return;
    };
    let db = server.database();
    serve_through_an_outage(&db.url, || server.stop(), || server.start());
}

/// Release 0.2.0's centralized driver writes PostgreSQL's SQL: through the
/// adapter, its connection to MariaDB is refused by name.
#[test]
fn a_release_0_2_centralized_driver_is_refused_on_mariadb() {
    let m = MariaSetup::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = image_cache_tests::release_config(dir.path(), "0.2.0", "centralized_driver");
    image_cache_tests::Centralized::Mariadb(m).configure(&mut config);
    let message = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(
        message.contains("contract 0.2.0 driver writes PostgreSQL's SQL"),
        "{message}"
    );
}
