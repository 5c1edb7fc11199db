//! Glance's options, read from a `glance-cache.conf` style file, and the
//! size and duration syntax operators type.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration file or its options cannot be used. Each keeps
/// the file, section, key and value involved; the message names them as
/// an operator wrote them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The text is not INI.
    #[error("{}{message}", in_file(path))]
    Syntax {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        message: String,
    },
    /// A known key has a value that cannot be used.
    #[error("{}[{section}] {key} = {value:?}: {reason}", in_file(path))]
    Value {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// The INI section (`DEFAULT`, `database`).
        section: &'static str,
        key: String,
        value: String,
        reason: ValueError,
    },
}

impl ConfigError {
    /// The same error, found in the file at `path`.
    fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: Some(file.to_path_buf()),
                message,
            },
            ConfigError::Value {
                section,
                key,
                value,
                reason,
                ..
            } => ConfigError::Value {
                path: Some(file.to_path_buf()),
                section,
                key,
                value,
                reason,
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

/// `path: ` before a message about a file's text, nothing for text alone.
fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

/// Why an option's value is not one (the `parse_*` functions, also the
/// command line's value parsers). The message quotes the text as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{0:?} is not a pool size (1 to 1000 connections)")]
    PoolSize(String),
    #[error("{0:?} is not a boolean (true or false)")]
    Bool(String),
    #[error("{0:?} is not a size (examples: 1048576, 512MiB, 10G)")]
    Size(String),
    /// A size whose unit is none of ours.
    #[error(
        "{0:?}: unknown size unit {unit:?} (use K, M, G, T, KiB ... or KB ...)",
        unit = split_size(.0).1
    )]
    SizeUnit(String),
    #[error("{0:?} is too large")]
    SizeTooLarge(String),
    #[error("{0:?}: a size in bytes is a whole number")]
    FractionalBytes(String),
    #[error("{0:?} is not a duration (examples: 3600, 90s, 30m, 1h, 1d, 2w)")]
    Duration(String),
    #[error("{0:?} is too long a duration")]
    DurationTooLong(String),
    #[error("not a port number")]
    Port,
    #[error(transparent)]
    FailPolicy(#[from] crate::fail::UnknownFailPolicy),
}

/// The options of the specification (docs/src/spec.md), each unset unless given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    pub image_cache_dir: Option<PathBuf>,
    pub image_cache_driver: Option<String>,
    pub image_cache_max_size: Option<u64>,
    pub image_cache_stall_time: Option<Duration>,
    pub image_cache_sqlite_db: Option<String>,
    pub image_cache_driver_sha256: Option<String>,
    pub image_cache_driver_grants: Option<String>,
    /// The public key files a component file driver must be signed by
    /// (one of them at least): a comma-separated list in the file. Empty:
    /// signatures are not checked.
    pub image_cache_driver_trusted_keys: Option<Vec<PathBuf>>,
    /// The centralized driver's database: our own option (a libpq, MySQL
    /// or SQLAlchemy URL); wins over `database_connection`.
    pub image_cache_database_url: Option<String>,
    /// Glance's `[database] connection` (SQLAlchemy URL).
    pub database_connection: Option<String>,
    /// Glance's name for this node in the shared database.
    pub worker_self_reference_url: Option<String>,
    /// Accept a database role that is a superuser or may reach server
    /// files and programs.
    pub image_cache_database_allow_privileged_role: Option<bool>,
    /// Most connections one process holds to the database (our option;
    /// else Glance's `[database] max_pool_size`).
    pub image_cache_database_pool_size: Option<usize>,
    /// Glance's `[database] max_pool_size`.
    pub database_max_pool_size: Option<usize>,
    /// The server-side bound of one statement, lock wait and idle
    /// transaction.
    pub image_cache_database_statement_timeout: Option<Duration>,
    /// How long opening a connection may take.
    pub image_cache_database_connect_timeout: Option<Duration>,
    /// glance-api.conf's address for the API (`image-cache serve`).
    pub bind_host: Option<String>,
    /// glance-api.conf's port for the API (`image-cache serve`).
    pub bind_port: Option<u16>,
    /// glance-api.conf's prefetcher period (`image-cache serve`).
    pub cache_prefetcher_interval: Option<Duration>,
    /// What `image-cache serve` does while its driver fails (our option).
    pub image_cache_fail_policy: Option<crate::fail::FailPolicy>,
}

impl Options {
    /// Read the `[DEFAULT]` section of an INI file (glance-cache.conf,
    /// glance-api.conf). Other sections and unknown keys are ignored; a
    /// known key with a bad value is an error naming the file and key.
    pub fn from_ini_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut options = Options::from_ini(&text).map_err(|e| e.in_file(path))?;
        // Key files named relative to the file that names them, not to
        // wherever the tool happens to run.
        if let (Some(keys), Some(dir)) =
            (&mut options.image_cache_driver_trusted_keys, path.parent())
        {
            for key in keys.iter_mut().filter(|k| k.is_relative()) {
                *key = dir.join(&*key);
            }
        }
        Ok(options)
    }

    /// [`Options::from_ini_file`] on text of no file.
    pub fn from_ini(text: &str) -> Result<Options, ConfigError> {
        let ini = ini::Ini::load_from_str_noescape(text).map_err(|e| ConfigError::Syntax {
            path: None,
            message: e.to_string(),
        })?;
        let mut options = Options::default();
        if let Some(database) = ini.section(Some("database"))
            && let Some(url) = database.get("connection").map(str::trim)
            && !url.is_empty()
        {
            options.database_connection = Some(url.to_string());
        }
        if let Some(database) = ini.section(Some("database"))
            && let Some(n) = database.get("max_pool_size").map(str::trim)
            && !n.is_empty()
        {
            options.database_max_pool_size =
                Some(parse_pool_size(n).map_err(|reason| ConfigError::Value {
                    path: None,
                    section: "database",
                    key: "max_pool_size".into(),
                    value: n.to_string(),
                    reason,
                })?);
        }
        let Some(section) = ini.section(Some("DEFAULT")) else {
            return Ok(options);
        };
        for (key, value) in section.iter() {
            let value = value.trim();
            let bad = |reason: ValueError| ConfigError::Value {
                path: None,
                section: "DEFAULT",
                key: key.to_string(),
                value: value.to_string(),
                reason,
            };
            match key.trim() {
                "image_cache_dir" => options.image_cache_dir = Some(PathBuf::from(value)),
                "image_cache_driver" => options.image_cache_driver = Some(value.to_string()),
                "image_cache_max_size" => {
                    options.image_cache_max_size = Some(parse_size(value).map_err(bad)?)
                }
                "image_cache_stall_time" => {
                    options.image_cache_stall_time = Some(parse_duration(value).map_err(bad)?)
                }
                "image_cache_sqlite_db" => options.image_cache_sqlite_db = Some(value.to_string()),
                "image_cache_driver_sha256" => {
                    options.image_cache_driver_sha256 = Some(value.to_string())
                }
                "image_cache_driver_grants" => {
                    options.image_cache_driver_grants = Some(value.to_string())
                }
                "image_cache_driver_trusted_keys" => {
                    options.image_cache_driver_trusted_keys = Some(path_list(value))
                }
                "image_cache_database_url" => {
                    options.image_cache_database_url = Some(value.to_string())
                }
                "worker_self_reference_url" => {
                    options.worker_self_reference_url = Some(value.to_string())
                }
                "image_cache_database_allow_privileged_role" => {
                    options.image_cache_database_allow_privileged_role =
                        Some(parse_bool(value).map_err(bad)?)
                }
                "image_cache_database_pool_size" => {
                    options.image_cache_database_pool_size =
                        Some(parse_pool_size(value).map_err(bad)?)
                }
                "image_cache_database_statement_timeout" => {
                    options.image_cache_database_statement_timeout =
                        Some(parse_duration(value).map_err(bad)?)
                }
                "image_cache_database_connect_timeout" => {
                    options.image_cache_database_connect_timeout =
                        Some(parse_duration(value).map_err(bad)?)
                }
                "bind_host" => options.bind_host = Some(value.to_string()),
                "bind_port" => {
                    options.bind_port = Some(value.parse().map_err(|_| bad(ValueError::Port))?)
                }
                "cache_prefetcher_interval" => {
                    options.cache_prefetcher_interval = Some(parse_duration(value).map_err(bad)?)
                }
                "image_cache_fail_policy" => {
                    options.image_cache_fail_policy =
                        Some(value.parse().map_err(|e| bad(ValueError::FailPolicy(e)))?)
                }
                _ => {}
            }
        }
        Ok(options)
    }

    /// Options set here win over those in `other`.
    pub fn or(self, other: Options) -> Options {
        Options {
            image_cache_dir: self.image_cache_dir.or(other.image_cache_dir),
            image_cache_driver: self.image_cache_driver.or(other.image_cache_driver),
            image_cache_max_size: self.image_cache_max_size.or(other.image_cache_max_size),
            image_cache_stall_time: self.image_cache_stall_time.or(other.image_cache_stall_time),
            image_cache_sqlite_db: self.image_cache_sqlite_db.or(other.image_cache_sqlite_db),
            image_cache_driver_sha256: self
                .image_cache_driver_sha256
                .or(other.image_cache_driver_sha256),
            image_cache_driver_grants: self
                .image_cache_driver_grants
                .or(other.image_cache_driver_grants),
            image_cache_driver_trusted_keys: self
                .image_cache_driver_trusted_keys
                .or(other.image_cache_driver_trusted_keys),
            image_cache_database_url: self
                .image_cache_database_url
                .or(other.image_cache_database_url),
            database_connection: self.database_connection.or(other.database_connection),
            worker_self_reference_url: self
                .worker_self_reference_url
                .or(other.worker_self_reference_url),
            image_cache_database_allow_privileged_role: self
                .image_cache_database_allow_privileged_role
                .or(other.image_cache_database_allow_privileged_role),
            image_cache_database_pool_size: self
                .image_cache_database_pool_size
                .or(other.image_cache_database_pool_size),
            database_max_pool_size: self.database_max_pool_size.or(other.database_max_pool_size),
            image_cache_database_statement_timeout: self
                .image_cache_database_statement_timeout
                .or(other.image_cache_database_statement_timeout),
            image_cache_database_connect_timeout: self
                .image_cache_database_connect_timeout
                .or(other.image_cache_database_connect_timeout),
            bind_host: self.bind_host.or(other.bind_host),
            bind_port: self.bind_port.or(other.bind_port),
            cache_prefetcher_interval: self
                .cache_prefetcher_interval
                .or(other.cache_prefetcher_interval),
            image_cache_fail_policy: self
                .image_cache_fail_policy
                .or(other.image_cache_fail_policy),
        }
    }

    /// Connections one process may hold: ours, else Glance's
    /// `[database] max_pool_size`.
    pub fn database_pool_size(&self) -> Option<usize> {
        self.image_cache_database_pool_size
            .or(self.database_max_pool_size)
    }

    /// The centralized driver's database URL: ours, else Glance's.
    pub fn database_url(&self) -> Option<&str> {
        self.image_cache_database_url
            .as_deref()
            .or(self.database_connection.as_deref())
            .filter(|u| !u.trim().is_empty())
    }
}

/// Paths separated by commas (`a.pub, b.pub`), each trimmed; empty ones
/// dropped.
pub fn path_list(s: &str) -> Vec<PathBuf> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// A connection pool's size: 1 to 1000.
pub fn parse_pool_size(s: &str) -> Result<usize, ValueError> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(ValueError::PoolSize(s.to_string())),
    }
}

/// oslo.config's booleans: true/false, yes/no, on/off, 1/0.
pub fn parse_bool(s: &str) -> Result<bool, ValueError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(ValueError::Bool(s.to_string())),
    }
}

/// A size in bytes: `1048576`, `512K`, `10G`, `512MiB`, `1.5GiB`, `100MB`.
/// K, M, G, T (with or without `iB`) are powers of 1024; KB, MB, GB, TB are
/// powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let s = s.trim();
    let (number, unit) = split_size(s);
    let number: f64 = number
        .parse()
        .map_err(|_| ValueError::Size(s.to_string()))?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(ValueError::SizeUnit(s.to_string()));
        }
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(ValueError::SizeTooLarge(s.to_string()));
    }
    if unit.is_empty() && number.fract() != 0.0 {
        return Err(ValueError::FractionalBytes(s.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// A trimmed size's number and unit (`512MiB` -> `512`, `MiB`).
fn split_size(s: &str) -> (&str, &str) {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    (number, unit.trim())
}

/// A duration: `3600` (seconds), `90s`, `30m`, `1h`, `1d`, `2w`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    if let Ok(seconds) = s.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let weeks = s.replace('w', "*7d");
    let mut total = 0u64;
    let mut number = String::new();
    let mut multiplier = 1u64;
    let mut saw_unit = false;
    for c in weeks.chars() {
        match c {
            '0'..='9' => number.push(c),
            '*' => {
                multiplier = number.parse().map_err(|_| bad_duration(s))?;
                number.clear();
            }
            's' | 'm' | 'h' | 'd' => {
                let n: u64 = number.parse().map_err(|_| bad_duration(s))?;
                let unit = match c {
                    's' => 1,
                    'm' => 60,
                    'h' => 3_600,
                    _ => 86_400,
                };
                total = n
                    .checked_mul(unit)
                    .and_then(|t| t.checked_mul(multiplier))
                    .and_then(|t| t.checked_add(total))
                    .ok_or_else(|| ValueError::DurationTooLong(s.to_string()))?;
                multiplier = 1;
                number.clear();
                saw_unit = true;
            }
            _ => return Err(bad_duration(s)),
        }
    }
    if !number.is_empty() || !saw_unit {
        return Err(bad_duration(s));
    }
    Ok(Duration::from_secs(total))
}

fn bad_duration(s: &str) -> ValueError {
    ValueError::Duration(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_pool_and_timeouts_from_the_file() {
        let o = Options::from_ini(
            "[DEFAULT]\nimage_cache_database_statement_timeout = 5s\n\
             image_cache_database_connect_timeout = 2s\n\
             [database]\nconnection = mysql+pymysql://g:p@h/glance\nmax_pool_size = 3\n",
        )
        .unwrap();
        assert_eq!(o.database_pool_size(), Some(3));
        assert_eq!(
            o.image_cache_database_statement_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            o.image_cache_database_connect_timeout,
            Some(Duration::from_secs(2))
        );
        let ours = Options::from_ini(
            "[DEFAULT]\nimage_cache_database_pool_size = 2\n[database]\nmax_pool_size = 9\n",
        )
        .unwrap();
        assert_eq!(ours.database_pool_size(), Some(2));
        for bad in ["0", "1001", "x", "-1"] {
            let e = Options::from_ini(&format!(
                "[DEFAULT]\nimage_cache_database_pool_size = {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("pool size"), "{e}");
        }
        assert!(Options::from_ini("[database]\nmax_pool_size = 0\n").is_err());
    }

    #[test]
    fn errors_keep_the_file_key_and_value() {
        let e = Options::from_ini("[DEFAULT]\nimage_cache_max_size = lots\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "[DEFAULT] image_cache_max_size = \"lots\": \"lots\" is not a size (examples: 1048576, 512MiB, 10G)"
        );
        assert!(matches!(
            &e,
            ConfigError::Value { path: None, key, value, reason: ValueError::Size(_), .. }
                if key == "image_cache_max_size" && value == "lots"
        ));
        let e = Options::from_ini("[database]\nmax_pool_size = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "[database] max_pool_size = \"0\": \"0\" is not a pool size (1 to 1000 connections)"
        );
        let e = Options::from_ini("[DEFAULT]\nbind_port = http\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "[DEFAULT] bind_port = \"http\": not a port number"
        );

        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("glance-cache.conf");
        std::fs::write(&conf, "[DEFAULT]\nimage_cache_stall_time = soon\n").unwrap();
        let e = Options::from_ini_file(&conf).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: [DEFAULT] image_cache_stall_time = \"soon\": \"soon\" is not a duration \
                 (examples: 3600, 90s, 30m, 1h, 1d, 2w)",
                conf.display()
            )
        );
        assert!(matches!(e, ConfigError::Value { path: Some(p), .. } if p == conf));
        std::fs::write(&conf, "[DEFAULT\nx = 1\n").unwrap();
        let e = Options::from_ini_file(&conf).unwrap_err();
        assert!(matches!(&e, ConfigError::Syntax { path: Some(p), .. } if *p == conf));
        assert!(
            e.to_string().starts_with(&format!("{}: ", conf.display())),
            "{e}"
        );
        let missing = dir.path().join("missing.conf");
        let e = Options::from_ini_file(&missing).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{}: ", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn trusted_keys_are_a_list_relative_to_the_file() {
        let o = Options::from_ini(
            "[DEFAULT]\nimage_cache_driver_trusted_keys = a.pub, /etc/keys/b.pub ,\n",
        )
        .unwrap();
        assert_eq!(
            o.image_cache_driver_trusted_keys,
            Some(vec![
                PathBuf::from("a.pub"),
                PathBuf::from("/etc/keys/b.pub")
            ])
        );
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("glance-cache.conf");
        std::fs::write(
            &conf,
            "[DEFAULT]\nimage_cache_driver_trusted_keys = a.pub, /b.pub\n",
        )
        .unwrap();
        let o = Options::from_ini_file(&conf).unwrap();
        assert_eq!(
            o.image_cache_driver_trusted_keys,
            Some(vec![dir.path().join("a.pub"), PathBuf::from("/b.pub")])
        );
        let flags = Options {
            image_cache_driver_trusted_keys: Some(vec![PathBuf::from("flag.pub")]),
            ..Options::default()
        };
        assert_eq!(
            flags.or(o).image_cache_driver_trusted_keys,
            Some(vec![PathBuf::from("flag.pub")])
        );
    }

    #[test]
    fn sizes_accept_what_operators_type() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("ten").is_err());
        assert_eq!(
            parse_size(" 10 XB ").unwrap_err().to_string(),
            "\"10 XB\": unknown size unit \"XB\" (use K, M, G, T, KiB ... or KB ...)"
        );
        assert!(parse_size("1.5").is_err());
    }

    #[test]
    fn durations_accept_what_operators_type() {
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("-5").is_err());
    }

    #[test]
    fn reads_glance_cache_conf() {
        let text = "# glance-cache.conf\n[DEFAULT]\nimage_cache_dir = /var/lib/glance/image-cache/\n\
                    image_cache_max_size = 10737418240\nimage_cache_stall_time = 86400\n\
                    image_cache_driver = xattr\nverbose = true\n[glance_store]\nfilesystem_store_datadir = /x\n";
        let o = Options::from_ini(text).unwrap();
        assert_eq!(
            o.image_cache_dir,
            Some(PathBuf::from("/var/lib/glance/image-cache/"))
        );
        assert_eq!(o.image_cache_max_size, Some(10 << 30));
        assert_eq!(o.image_cache_stall_time, Some(Duration::from_secs(86_400)));
        assert_eq!(o.image_cache_driver.as_deref(), Some("xattr"));
        assert_eq!(o.image_cache_sqlite_db, None);
        let err = Options::from_ini("[DEFAULT]\nimage_cache_max_size = lots\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("image_cache_max_size"), "{err}");
    }

    #[test]
    fn reads_the_database_of_glance_api_conf() {
        let text = "[DEFAULT]\nimage_cache_dir = /c\nimage_cache_driver = centralized_db\n\
                    worker_self_reference_url = http://node-1:9292\n\
                    [database]\nconnection = postgresql+psycopg2://glance:pw@db/glance\n";
        let o = Options::from_ini(text).unwrap();
        assert_eq!(
            o.database_url(),
            Some("postgresql+psycopg2://glance:pw@db/glance")
        );
        assert_eq!(
            o.worker_self_reference_url.as_deref(),
            Some("http://node-1:9292")
        );
        let ours = Options::from_ini(
            "[DEFAULT]\nimage_cache_database_url = postgresql://x@y/z\n[database]\nconnection = postgresql://a@b/c\n",
        )
        .unwrap();
        assert_eq!(ours.database_url(), Some("postgresql://x@y/z"));
        let err =
            Options::from_ini("[DEFAULT]\nimage_cache_database_allow_privileged_role = maybe\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("image_cache_database_allow_privileged_role"),
            "{err}"
        );
    }

    #[test]
    fn the_fail_policy_is_read_and_checked() {
        use crate::fail::FailPolicy;
        let o = Options::from_ini("[DEFAULT]\nimage_cache_fail_policy = fail-open\n").unwrap();
        assert_eq!(o.image_cache_fail_policy, Some(FailPolicy::Open));
        let flags = Options {
            image_cache_fail_policy: Some(FailPolicy::Reload),
            ..Options::default()
        };
        assert_eq!(
            flags.or(o.clone()).image_cache_fail_policy,
            Some(FailPolicy::Reload)
        );
        assert_eq!(
            Options::default().or(o).image_cache_fail_policy,
            Some(FailPolicy::Open)
        );
        let e = Options::from_ini("[DEFAULT]\nimage_cache_fail_policy = open\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "[DEFAULT] image_cache_fail_policy = \"open\": \"open\" is not a fail policy (fail-closed, fail-open or fail-reload)"
        );
    }
}
