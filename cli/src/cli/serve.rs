//! `image-cache serve`'s flags, and the server's [`Config`] they make with
//! the settings (flags, environment, config file) the other commands share.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use image_cache::FailPolicy;
use image_cache::config::{parse_duration, parse_size};
use image_cache_serve::{Config, Reload, Reloaded, Secret, ServeError, Token};

use super::{Failure, Global, Settings};

/// Serve the cache over HTTP: image downloads with pull-through caching
/// from an upstream (a Glance API or a directory), Glance's cache
/// management API, and the prefetcher, pruner and cleaner on intervals.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Tokens: the admin token (cache API, driver swap) comes from \
--admin-token-file or IMAGE_CACHE_ADMIN_TOKEN; without one the management API answers 403. \
Clients send tokens as X-Auth-Token.\n\n\
The --config file's [DEFAULT] section may also give bind_host, bind_port and \
cache_prefetcher_interval (glance-api.conf names), and image_cache_fail_policy. SIGHUP \
re-reads the configuration and swaps the driver; SIGTERM stops gracefully."
)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:9292, or bind_host:bind_port
    /// from the --config file). Port 0 picks a free port; the address is
    /// printed on stdout.
    #[arg(long, env = "IMAGE_CACHE_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Where misses are fetched: a Glance API base URL (GET
    /// URL/v2/images/ID/file, passing the client's X-Auth-Token) or a
    /// directory with one file per image id. Without it, misses are 404.
    #[arg(long, env = "IMAGE_CACHE_UPSTREAM", value_name = "URL|DIR")]
    upstream: Option<String>,

    /// File holding the admin token (else IMAGE_CACHE_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// File holding a token image downloads must carry (the admin token is
    /// accepted too); else IMAGE_CACHE_IMAGE_TOKEN. Unset, with a Glance
    /// upstream: the upstream authorizes each download with the client's
    /// token.
    #[arg(long, value_name = "FILE")]
    image_token_file: Option<PathBuf>,

    /// Serve every image to anyone, without a token (needed, or
    /// --image-token-file, when the upstream is a directory or there is
    /// none).
    #[arg(long)]
    public_downloads: bool,

    /// How long the upstream's answer to "may this token download this
    /// image" is remembered (0: ask for every download).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    auth_cache_ttl: Duration,

    /// File holding the token sent to a Glance upstream by the prefetcher,
    /// and for clients when downloads are protected by --image-token-file
    /// (else IMAGE_CACHE_UPSTREAM_TOKEN).
    #[arg(long, value_name = "FILE")]
    upstream_token_file: Option<PathBuf>,

    /// Prune target (default: image_cache_max_size, or 10 GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,

    /// Stall time for clean (default: image_cache_stall_time, or 1 day).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stall_time: Option<Duration>,

    /// Hard ceiling: an image that would push the cache over it is served
    /// but not cached. Default: none.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_ceiling: Option<u64>,

    /// Admission: a fill that would take the cache over --max-size first
    /// evicts least recently used images, at most N of them; if that is
    /// not enough, or the image alone is larger than --max-size, it is
    /// served but not cached. 0: fills do not evict, and the cache stays
    /// over --max-size until the next prune (Glance's behaviour).
    #[arg(long, value_name = "N", default_value_t = 100)]
    fill_evict_budget: u32,

    /// File holding the token the nodes of one fleet send each other
    /// (else IMAGE_CACHE_PEER_TOKEN): with it, a miss is read from a
    /// sibling node that holds the image (the centralized driver knows
    /// which) before the upstream, resumed from the upstream at the byte
    /// reached if the sibling fails, and siblings' requests are answered
    /// from this node's cache only. This node's URL is
    /// --worker-self-reference-url.
    #[arg(long, value_name = "FILE")]
    peer_token_file: Option<PathBuf>,

    /// Siblings whose URL starts with PREFIX are asked first (the same
    /// zone or rack); repeatable.
    #[arg(long, value_name = "PREFIX")]
    prefer_peer: Vec<String>,

    /// How often the prefetcher runs (0 = never; default
    /// cache_prefetcher_interval, or 300s). Queuing an image through the
    /// API also wakes it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    prefetch_interval: Option<Duration>,

    /// How often the cache is pruned to the max size (0 = never).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    prune_interval: Duration,

    /// How often invalid and stalled files are cleaned (0 = never).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    clean_interval: Duration,

    /// A client connection with no byte read or written for this long is
    /// closed (also the keep-alive and request-head timeout).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    client_timeout: Duration,

    /// An upstream that sends nothing for this long fails the fetch.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    upstream_timeout: Duration,

    /// A fetch must average at least this many bytes per second over each
    /// --upstream-timeout window, or it fails (0: no minimum).
    #[arg(long, value_name = "SIZE", default_value = "16KiB", value_parser = parse_size)]
    upstream_min_rate: u64,

    /// An origin (scheme://host[:port]) the Glance upstream may redirect
    /// downloads to; the token is never sent there. Repeatable. Redirects
    /// to any other origin fail the fetch.
    #[arg(long, value_name = "URL")]
    upstream_allow_redirect: Vec<String>,

    /// Most images fetched from the upstream at once; a miss past it is a
    /// 503 with Retry-After (clients of fetches under way still join them).
    #[arg(long, value_name = "N", default_value = "64")]
    max_fetches: usize,

    /// Most client connections at once; past it a new connection gets a
    /// 503 and is closed. Default: 4096, or less when the open-files
    /// limit is lower.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Free space kept on the cache's file system: an image that would
    /// leave less is served but not cached (room for the database).
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = parse_size)]
    disk_reserve: u64,

    /// On SIGTERM, how long in-flight responses and fetches may take to
    /// finish before they are cut (fetches then abort: no partial image).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,

    /// Directory for the spool files misses are streamed through (unnamed
    /// temporary files). Default: the system's temporary directory.
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,

    /// Logs as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,

    /// A driver swapped in that faults more than this many times within
    /// --rollback-window of the swap is rolled back to the previous driver
    /// by itself (0: never).
    #[arg(
        long,
        env = "IMAGE_CACHE_ROLLBACK_MAX_FAULTS",
        value_name = "N",
        default_value = "5"
    )]
    rollback_max_faults: u64,

    /// How long after a swap faults count towards an automatic rollback.
    #[arg(long, env = "IMAGE_CACHE_ROLLBACK_WINDOW", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    rollback_window: Duration,

    /// What a download gets while the driver fails (it faults, is
    /// overloaded, or cannot reach its database): fail-closed, the error
    /// (5xx); fail-open, the image from the upstream, verified but not
    /// cached; fail-reload, a driver that faults is rolled back to the one
    /// before the last swap and the call retried once (else as
    /// fail-closed). Default: image_cache_fail_policy from the --config
    /// file, or fail-open.
    #[arg(long, env = "IMAGE_CACHE_FAIL_POLICY", value_name = "POLICY", value_parser = parse_fail_policy)]
    fail_policy: Option<FailPolicy>,
}

/// `--fail-policy`'s value.
fn parse_fail_policy(s: &str) -> Result<FailPolicy, String> {
    s.parse()
        .map_err(|e: image_cache::fail::UnknownFailPolicy| e.to_string())
}

impl ServeArgs {
    pub fn log_json(&self) -> bool {
        self.log_json
    }

    /// The server's configuration: these flags over the settings.
    pub fn config(&self, settings: &Settings) -> Result<Config, Failure> {
        let listen = match self.listen {
            Some(a) => a,
            None => {
                let host = settings.bind_host.as_deref().unwrap_or("127.0.0.1");
                let port = settings.bind_port.unwrap_or(9292);
                let text = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                text.parse().map_err(|_| {
                    Failure::Usage(format!(
                        "bind_host/bind_port {text:?} is not an address (default 127.0.0.1:9292)"
                    ))
                })?
            }
        };
        let defaults = Config::default();
        Ok(Config {
            listen,
            upstream: self.upstream.clone(),
            upstream_allow_redirect: self.upstream_allow_redirect.clone(),
            admin_token: token(self.admin_token_file.as_ref(), "IMAGE_CACHE_ADMIN_TOKEN")?,
            image_token: token(self.image_token_file.as_ref(), "IMAGE_CACHE_IMAGE_TOKEN")?,
            upstream_token: secret(
                self.upstream_token_file.as_ref(),
                "IMAGE_CACHE_UPSTREAM_TOKEN",
            )?,
            public_downloads: self.public_downloads,
            auth_cache_ttl: self.auth_cache_ttl,
            max_size: self.max_size.unwrap_or(settings.max_size),
            stall_time: self.stall_time.unwrap_or(settings.stall_time),
            cache_ceiling: self.cache_ceiling,
            fill_evict_budget: self.fill_evict_budget,
            peer_token: secret(self.peer_token_file.as_ref(), "IMAGE_CACHE_PEER_TOKEN")?,
            self_url: settings.worker_self_reference_url.clone(),
            prefer_peers: self.prefer_peer.clone(),
            prefetch_interval: self
                .prefetch_interval
                .or(settings.prefetch_interval)
                .unwrap_or(defaults.prefetch_interval),
            prune_interval: self.prune_interval,
            clean_interval: self.clean_interval,
            client_timeout: self.client_timeout,
            upstream_timeout: self.upstream_timeout,
            upstream_min_rate: self.upstream_min_rate,
            max_fetches: self.max_fetches,
            max_connections: self.max_connections,
            disk_reserve: self.disk_reserve,
            shutdown_timeout: self.shutdown_timeout,
            spool_dir: self.spool_dir.clone().unwrap_or(defaults.spool_dir),
            rollback_max_faults: self.rollback_max_faults,
            rollback_window: self.rollback_window,
            fail_policy: self
                .fail_policy
                .or(settings.fail_policy)
                .unwrap_or(defaults.fail_policy),
            driver_resolver: Some(settings.driver_resolver()?),
        })
    }

    /// What SIGHUP takes: the settings resolved again, these flags still
    /// winning over them.
    fn reload(&self, global: &Global) -> Reload {
        let (global, flags) = (global.clone(), self.clone());
        Box::new(move || {
            let settings =
                Settings::resolve(&global).map_err(|e| ServeError::Config(e.to_string()))?;
            Ok(Reloaded {
                root: settings.dir.clone().unwrap_or_default(),
                driver: settings
                    .driver_source()
                    .map_err(|e| ServeError::Config(e.to_string()))?,
                max_size: flags.max_size.unwrap_or(settings.max_size),
                stall_time: flags.stall_time.unwrap_or(settings.stall_time),
                fail_policy: flags
                    .fail_policy
                    .or(settings.fail_policy)
                    .unwrap_or_default(),
            })
        })
    }
}

/// `image-cache serve`: open the cache, serve until SIGTERM.
pub fn run(global: &Global, settings: &Settings, args: &ServeArgs) -> Result<(), Failure> {
    let config = args.config(settings)?;
    let cache = settings.open_for_server()?;
    image_cache_serve::run(cache, config, Some(args.reload(global))).map_err(Failure::from)
}

/// A token from a file or, failing that, an environment variable; errors
/// name the file or variable, never the secret.
fn token(file: Option<&PathBuf>, env: &str) -> Result<Option<Token>, Failure> {
    if let Some(path) = file {
        let text = read_secret_file(path)?;
        return Token::new(&text)
            .map(Some)
            .map_err(|e| Failure::Usage(format!("token file {}: {e}", path.display())));
    }
    match std::env::var(env) {
        Ok(v) => Token::new(&v)
            .map(Some)
            .map_err(|e| Failure::Usage(format!("{env}: {e}"))),
        Err(_) => Ok(None),
    }
}

/// A secret the server sends, from a file (which must not be empty) or
/// an environment variable.
pub(crate) fn secret(file: Option<&PathBuf>, env: &str) -> Result<Option<Secret>, Failure> {
    if let Some(path) = file {
        let text = read_secret_file(path)?;
        return match Secret::new(&text) {
            Some(s) => Ok(Some(s)),
            None => Err(Failure::Usage(format!(
                "token file {}: empty",
                path.display()
            ))),
        };
    }
    Ok(std::env::var(env).ok().and_then(|v| Secret::new(&v)))
}

fn read_secret_file(path: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("token file {}: {e}", path.display())))
}
