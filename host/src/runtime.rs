//! The wasmtime side: one engine per process, driver components checked,
//! loaded and pre-instantiated once, and stores with limits for each driver
//! instance.
//!
//! - The engine has the component model and epoch interruption on; a ticker
//!   thread advances the epoch and stops when the engine is dropped (it only
//!   holds a weak reference).
//! - Before anything is compiled, a component's bytes are checked: the
//!   SHA-256 an operator pinned, its signature by a key the operator
//!   trusts (see [`crate::signature`]), the contract version it exports (see
//!   [`crate::contract`]), and that every interface it imports was granted.
//!   Then it is compiled (or its compiled artifact is loaded from a directory
//!   outside any cache root, keyed by its SHA-256 and the engine's settings)
//!   and linked with exactly the granted interfaces: an ungranted interface
//!   is never linked for it.
//! - A store holds one instance's resource table, its share of the driver's
//!   memory budget, and the deadline of the call running in it, which the
//!   host imports honour as well (a query, a lock wait, a busy wait).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasData, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};

use crate::bindings::{clock, types};
use crate::contract::{Capability, Grants, Manifest, read_manifest};
use crate::database::{DatabaseRoot, DatabaseView};
use crate::error::{Error, Result};
use crate::fs::{FsView, RangeLocks, RootFs};
use crate::limits::{DEFAULT_MAX_LISTING, DEFAULT_MAX_RESULT_BYTES, Deadline};
use crate::signature::TrustedKeys;
use crate::xattr::{XattrSupport, XattrView};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits for the instances of one driver on one root.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest a single driver call may run, host imports included, before
    /// it is stopped.
    pub call_deadline: Duration,
    /// Most linear memory all instances of one driver may hold together.
    pub memory_bytes: usize,
    /// Most host resources (open files, connections) one instance may hold.
    pub resources: usize,
    /// Most database connections (`database` interface) one instance may
    /// hold.
    pub connections: usize,
    /// Most live instances of one driver; a call that finds them all busy
    /// waits up to `instance_wait`, then fails.
    pub instances: usize,
    /// How long a call waits for a free instance.
    pub instance_wait: Duration,
    /// Idle instances beyond the first are released after this long.
    pub idle_timeout: Duration,
    /// Most entries one directory listing may return.
    pub max_listing: usize,
    /// Most bytes one SQL query result may hold.
    pub max_query_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_deadline: Duration::from_secs(30),
            memory_bytes: 1 << 30,
            resources: 256,
            connections: 4,
            instances: 128,
            instance_wait: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_listing: DEFAULT_MAX_LISTING,
            max_query_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }
}

/// The linear memory all instances of one driver hold, against its cap.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    cap: usize,
}

impl MemoryBudget {
    pub fn new(cap: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            used: AtomicUsize::new(0),
            cap,
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.cap)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One instance's share of its driver's [`MemoryBudget`]; given back when
/// the store is dropped.
struct InstanceMemory {
    budget: Arc<MemoryBudget>,
    mine: usize,
}

/// Most table elements (function references) one instance may have.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl wasmtime::ResourceLimiter for InstanceMemory {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let extra = desired.saturating_sub(current);
        if self.budget.take(extra) {
            self.mine += extra;
            Ok(true)
        } else {
            // An error here traps the guest (a clear fault, not a silent -1).
            Err(wasmtime::Error::msg(format!(
                "growing memory to {desired} bytes would pass the driver's memory cap"
            )))
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl Drop for InstanceMemory {
    fn drop(&mut self) {
        self.budget.give_back(self.mine);
    }
}

/// What the host gives one driver on one root: shared by its instances.
pub struct Sandbox {
    pub root: Arc<RootFs>,
    /// The metadata database's name in the root (`image_cache_sqlite_db`):
    /// the one top-level file (with its journal) the driver may write.
    pub db_name: String,
    pub database: Arc<DatabaseRoot>,
    pub xattr: XattrSupport,
    pub memory: Arc<MemoryBudget>,
}

impl HostState {
    /// The export call returned (or was stopped): nothing the driver took
    /// in it outlives it, neither a byte-range lock nor a database
    /// transaction.
    pub(crate) fn end_call(&mut self) {
        self.range_locks.release_all();
        self.transactions.end_call(&mut self.table);
    }
}

/// What a store of a driver instance holds.
pub struct HostState {
    pub(crate) table: ResourceTable,
    sandbox: Arc<Sandbox>,
    memory: InstanceMemory,
    pub(crate) deadline: Deadline,
    /// Byte-range locks taken in the current call, released when it ends.
    pub(crate) range_locks: RangeLocks,
    /// Database transactions begun in the current call, rolled back if
    /// still open when it ends.
    pub(crate) transactions: crate::database::OpenTransactions,
    /// Database connections this instance holds.
    connections: usize,
    max_connections: usize,
}

/// Counters a host can read to see what the runtime did.
#[derive(Default, Debug)]
pub struct RuntimeStats {
    /// Components compiled by cranelift in this process.
    pub compiled: AtomicU64,
    /// Components loaded from the artifact directory instead.
    pub loaded_precompiled: AtomicU64,
    /// Driver instances created.
    pub instances: AtomicU64,
    /// Instances discarded after a trap or a deadline.
    pub instances_discarded: AtomicU64,
}

/// The engine, a linker per grant set and the artifact directory.
pub struct Runtime {
    engine: Engine,
    linkers: Mutex<HashMap<Grants, Arc<Linker<HostState>>>>,
    artifacts: Option<PathBuf>,
    limits: Limits,
    /// Components loaded so far, by SHA-256 and grants: each is compiled once.
    components: Mutex<HashMap<(String, Grants), Arc<DriverComponent>>>,
    pub stats: RuntimeStats,
}

/// Why a name an operator gave is no driver ([`DriverSource::named`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverNameError {
    #[error("the driver name is empty")]
    Empty,
    /// Neither a built-in, nor an existing file, nor like a path.
    #[error(
        "unknown driver {0:?}: use {builtins} or the path of a driver component (.wasm)",
        builtins = builtin_names()
    )]
    Unknown(String),
}

/// The built-in drivers' names, for messages.
fn builtin_names() -> String {
    let names: Vec<&str> = crate::builtin::ALL.iter().map(|b| b.name).collect();
    names.join(", ")
}

/// Where a driver component comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverSource {
    /// One of the drivers built into this binary.
    Builtin(&'static str),
    /// A component file, e.g. a third party's driver.
    File(PathBuf),
}

impl DriverSource {
    /// `sqlite`, `xattr`, `centralized` (or Glance's `centralized_db`), or a
    /// path to a component file.
    pub fn parse(spec: &str) -> DriverSource {
        match crate::builtin::find(spec) {
            Some(b) => DriverSource::Builtin(b.name),
            None => DriverSource::File(PathBuf::from(spec)),
        }
    }

    /// The driver an operator named (`--driver`, `image_cache_driver`, the
    /// swap endpoint): a built-in by its name or alias, else the path of a
    /// component. A name that is neither a built-in nor an existing file
    /// nor looks like a path (a `/`, or `.wasm`) is refused, naming the
    /// built-ins; a path that does not exist is refused when it is loaded.
    pub fn named(spec: &str) -> std::result::Result<DriverSource, DriverNameError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(DriverNameError::Empty);
        }
        let source = DriverSource::parse(spec);
        if let DriverSource::File(path) = &source {
            let looks_like_path = spec.contains('/') || spec.ends_with(".wasm");
            if !looks_like_path && !path.exists() {
                return Err(DriverNameError::Unknown(spec.to_string()));
            }
        }
        Ok(source)
    }

    pub fn name(&self) -> String {
        match self {
            DriverSource::Builtin(name) => name.to_string(),
            DriverSource::File(path) => path.display().to_string(),
        }
    }
}

/// What a driver may be and touch: the operator's pin and grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadPolicy {
    /// The SHA-256 (hex) the component's bytes must have; checked before
    /// anything is compiled.
    pub sha256: Option<String>,
    /// What a component file is granted beyond `fs` and `clock`. Built-in
    /// drivers are granted what they need, whatever this says.
    pub grants: Grants,
    /// The keys a component file must be signed by (one of them at least;
    /// see [`crate::signature`]), checked before anything is compiled;
    /// none: signatures are not checked. Built-in drivers are part of the
    /// host binary and trusted with it.
    pub trusted_keys: Option<Arc<TrustedKeys>>,
}

/// A compiled driver component, ready to instantiate.
#[derive(Clone)]
pub struct DriverComponent {
    name: String,
    pre: crate::compat::Pre,
    sha256: String,
    manifest: Manifest,
    grants: Grants,
    precompiled: bool,
    signature: String,
}

impl DriverComponent {
    /// Its signature as found when it was loaded: `built-in`, verified by
    /// which trusted key, carried but not checked, or none.
    pub fn signature(&self) -> &str {
        &self.signature
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Its contract version and imports, as read before compiling it.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// What it was granted (and linked with).
    pub fn grants(&self) -> Grants {
        self.grants
    }

    /// Whether it came from the artifact directory (no compilation).
    pub fn was_precompiled(&self) -> bool {
        self.precompiled
    }

    pub(crate) fn pre(&self) -> &crate::compat::Pre {
        &self.pre
    }
}

/// The default artifact directory: `$XDG_CACHE_HOME/image-cache` or
/// `~/.cache/image-cache`.
pub fn default_artifact_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("image-cache").join("compiled"))
}

/// The SHA-256 of a component's bytes, as operators pin it (lowercase hex).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What `image-cache drivers inspect` shows of a component, read from its
/// bytes without compiling or running any of it.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub sha256: String,
    pub declared: crate::contract::Declared,
    /// Why this host would refuse it before compiling (contract version,
    /// imports outside the contract), if it would.
    pub refused: Option<String>,
}

impl Runtime {
    /// Everything a component says about itself: its SHA-256, its contract
    /// version, imports and the name, version and description it declares
    /// in its `image-cache:driver-info` section, and whether this host
    /// would refuse it. Nothing of it is compiled or run: a driver's code
    /// runs only once an operator loads it with its grants.
    pub fn inspect(&self, source: &DriverSource) -> Result<Inspection> {
        let name = source.name();
        let bytes = self.read_source(source)?;
        let sha256 = sha256_hex(&bytes);
        let declared = crate::contract::declared(&bytes).map_err(|e| Error::Load {
            driver: name.clone(),
            message: e.to_string(),
        })?;
        let refused = read_manifest(&name, &bytes).err().map(|e| match e {
            Error::Load { message, .. } => message,
            other => other.to_string(),
        });
        Ok(Inspection {
            sha256,
            declared,
            refused,
        })
    }

    /// A runtime with `limits`, keeping compiled components in `artifacts`
    /// (none: compile every time).
    pub fn new(limits: Limits, artifacts: Option<PathBuf>) -> Result<Arc<Runtime>> {
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        // `IMAGE_CACHE_PROFILE=perfmap` lets `perf` name driver functions.
        if std::env::var("IMAGE_CACHE_PROFILE").as_deref() == Ok("perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| load_error("engine", e))?;
        start_epoch_ticker(&engine);
        Ok(Arc::new(Runtime {
            engine,
            linkers: Default::default(),
            artifacts,
            limits,
            components: Default::default(),
            stats: RuntimeStats::default(),
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The driver component from `source`, checked against `policy`, loaded
    /// once per content and grants.
    pub fn component(
        &self,
        source: &DriverSource,
        policy: &LoadPolicy,
    ) -> Result<Arc<DriverComponent>> {
        let bytes = self.read_source(source)?;
        // Signed by a trusted key, before anything else is done with the
        // bytes (a component compiled earlier included); `load_bytes`,
        // which knows neither a built-in nor a `.sig` file, need not again.
        let signature = check_signature(&source.name(), Some(source), &bytes, policy)?;
        let policy = &LoadPolicy {
            trusted_keys: None,
            ..policy.clone()
        };
        let sha256 = sha256_hex(&bytes);
        let grants = grants_for(source, policy);
        let cached = self
            .components
            .lock()
            .unwrap()
            .get(&(sha256.clone(), grants))
            .cloned();
        if let Some(c) = cached {
            check_pin(&source.name(), &sha256, policy)?;
            // The same bytes under another name (a built-in driver's
            // component also loaded as a file): compiled once, named as
            // this caller named it.
            if c.name != source.name() || c.signature != signature {
                return Ok(Arc::new(DriverComponent {
                    name: source.name(),
                    signature,
                    ..(*c).clone()
                }));
            }
            return Ok(c);
        }
        let component = Arc::new(DriverComponent {
            signature,
            ..self.load_bytes(&source.name(), &bytes, policy, grants)?
        });
        self.components
            .lock()
            .unwrap()
            .insert((sha256, grants), component.clone());
        Ok(component)
    }

    /// The bytes of a driver component.
    pub fn read_source(&self, source: &DriverSource) -> Result<std::borrow::Cow<'static, [u8]>> {
        let name = source.name();
        Ok(match source {
            DriverSource::Builtin(n) => crate::builtin::find(n)
                .ok_or_else(|| Error::Load {
                    driver: name.clone(),
                    message: "no such built-in driver".into(),
                })?
                .component
                .into(),
            DriverSource::File(path) => std::fs::read(path)
                .map_err(|e| Error::Load {
                    driver: name.clone(),
                    message: e.to_string(),
                })?
                .into(),
        })
    }

    /// Check, compile (or fetch from the artifact directory) and
    /// pre-instantiate a component's bytes with `grants`, without memoizing.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        policy: &LoadPolicy,
        grants: Grants,
    ) -> Result<DriverComponent> {
        let sha256 = sha256_hex(bytes);
        check_pin(name, &sha256, policy)?;
        let signature = check_signature(name, None, bytes, policy)?;
        let manifest = read_manifest(name, bytes)?;
        check_grants(name, &manifest, grants)?;
        let (component, precompiled) = self.compile(name, &sha256, bytes)?;
        let linker = self.linker(grants).map_err(|e| load_error(name, e))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| load_error(name, e))?;
        let pre = crate::compat::Pre::new(manifest.version, instance_pre)
            .map_err(|e| load_error(name, e))?;
        Ok(DriverComponent {
            name: name.to_string(),
            pre,
            sha256,
            manifest,
            grants,
            precompiled,
            signature,
        })
    }

    /// The linker with exactly `grants` (plus `fs`, `clock`, `types`).
    fn linker(&self, grants: Grants) -> wasmtime::Result<Arc<Linker<HostState>>> {
        let mut linkers = self.linkers.lock().unwrap();
        if let Some(l) = linkers.get(&grants) {
            return Ok(l.clone());
        }
        let mut linker = Linker::<HostState>::new(&self.engine);
        link(&mut linker, grants)?;
        let linker = Arc::new(linker);
        linkers.insert(grants, linker.clone());
        Ok(linker)
    }

    fn artifact_path(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.artifacts.as_ref()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let engine_key = hasher.finish();
        Some(dir.join(format!("{sha256}-{engine_key:016x}.cwasm")))
    }

    fn compile(&self, name: &str, sha256: &str, bytes: &[u8]) -> Result<(Component, bool)> {
        let artifact = self.artifact_path(sha256);
        if let Some(path) = artifact.as_deref().filter(|p| p.exists()) {
            // Read into memory rather than map the file: another process
            // truncating it must not fault this one.
            // SAFETY: the artifact directory is the host's own (never inside a
            // cache root); its files are written by `save_artifact` under a
            // name that includes the engine's compatibility hash, and wasmtime
            // checks the header before using the code.
            let loaded = match std::fs::read(path) {
                Ok(bytes) => unsafe { Component::deserialize(&self.engine, bytes) }
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match loaded {
                Ok(component) => {
                    self.stats
                        .loaded_precompiled
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("driver {name}: loaded precompiled {}", path.display());
                    return Ok((component, true));
                }
                Err(e) => log::warn!(
                    "driver {name}: ignoring unusable artifact {}: {e}",
                    path.display()
                ),
            }
        }
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes).map_err(|e| load_error(name, e))?;
        self.stats.compiled.fetch_add(1, Ordering::Relaxed);
        log::debug!("driver {name}: compiled in {:?}", started.elapsed());
        if let Some(path) = artifact
            && let Err(e) = save_artifact(&component, &path)
        {
            log::warn!(
                "driver {name}: cannot keep compiled artifact {}: {e}",
                path.display()
            );
        }
        Ok((component, false))
    }

    /// A store for one driver instance in `sandbox`.
    pub(crate) fn store(&self, sandbox: &Arc<Sandbox>) -> Store<HostState> {
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.limits.resources);
        let mut store = Store::new(
            &self.engine,
            HostState {
                table,
                sandbox: sandbox.clone(),
                memory: InstanceMemory {
                    budget: sandbox.memory.clone(),
                    mine: 0,
                },
                deadline: Deadline(Instant::now() + self.limits.call_deadline),
                range_locks: RangeLocks::default(),
                transactions: Default::default(),
                connections: 0,
                max_connections: self.limits.connections,
            },
        );
        store.limiter(|s| &mut s.memory);
        store.set_epoch_deadline(self.deadline_ticks());
        store
    }

    pub(crate) fn deadline_ticks(&self) -> u64 {
        ticks(self.call_deadline())
    }

    /// The deadline of a driver call made now: the limit's, or the shorter
    /// one of a call that must not wait (it holds an event loop's thread).
    pub(crate) fn call_deadline(&self) -> Duration {
        if crate::limits::waiting_forbidden() {
            self.limits
                .call_deadline
                .min(crate::limits::NO_WAIT_DEADLINE)
        } else {
            self.limits.call_deadline
        }
    }
}

fn ticks(deadline: Duration) -> u64 {
    (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

/// Built-in drivers get what they need; files what the operator granted.
fn grants_for(source: &DriverSource, policy: &LoadPolicy) -> Grants {
    match source {
        DriverSource::Builtin(name) => crate::builtin::find(name)
            .map(|b| Grants::of(b.grants))
            .unwrap_or(Grants::NONE),
        DriverSource::File(_) => policy.grants,
    }
}

fn check_pin(name: &str, sha256: &str, policy: &LoadPolicy) -> Result<()> {
    match &policy.sha256 {
        Some(expected) if !expected.trim().eq_ignore_ascii_case(sha256) => Err(Error::Load {
            driver: name.to_string(),
            message: format!(
                "its SHA-256 is {sha256}, not the pinned {}; refused before compiling it",
                expected.trim()
            ),
        }),
        _ => Ok(()),
    }
}

/// A component's bytes against the policy's trusted keys, if any: a
/// built-in driver passes (its bytes are part of this binary); a component
/// file without an embedded signature may have a detached one beside it
/// (`<path>.sig`); bytes of no source (`load_bytes`) must carry theirs.
fn check_signature(
    name: &str,
    source: Option<&DriverSource>,
    bytes: &[u8],
    policy: &LoadPolicy,
) -> Result<String> {
    if let Some(DriverSource::Builtin(_)) = source {
        return Ok("built-in: part of the host binary".into());
    }
    let Some(trusted) = &policy.trusted_keys else {
        return Ok(match crate::signature::signatures(bytes, None) {
            Ok(Some(s)) => format!("{}, not checked (no trusted keys)", s.describe()),
            Ok(None) => "no embedded signature, not checked (no trusted keys)".into(),
            Err(e) => format!("signature unreadable ({e}), not checked (no trusted keys)"),
        });
    };
    let detached = match source {
        Some(DriverSource::File(path)) => {
            let sig = crate::signature::detached_path(path);
            match std::fs::read(&sig) {
                Ok(detached) => Some(detached),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Error::Load {
                        driver: name.to_string(),
                        message: format!("its signature file {}: {e}", sig.display()),
                    });
                }
            }
        }
        _ => None,
    };
    crate::signature::check(name, bytes, detached.as_deref(), trusted)
}

/// Refuse a component that imports an interface it was not granted.
fn check_grants(name: &str, manifest: &Manifest, grants: Grants) -> Result<()> {
    for need in &manifest.needs {
        if !grants.allows(*need) {
            let import = manifest
                .imports
                .iter()
                .find(|i| i.contains(&format!("/{}@", need.name())))
                .cloned()
                .unwrap_or_else(|| need.name().to_string());
            return Err(Error::Load {
                driver: name.to_string(),
                message: format!(
                    "it imports {import}, which it was not granted (granted: {grants}; \
                     grant it with image_cache_driver_grants = {})",
                    need.name()
                ),
            });
        }
    }
    Ok(())
}

fn load_error(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Load {
        driver: name.to_string(),
        message: format!("{e:#}"),
    }
}

fn save_artifact(component: &Component, path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("artifact path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    static TEMPS: AtomicU64 = AtomicU64::new(0);
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        TEMPS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&temp, component.serialize()?)?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

/// The names a compiled component imports.
pub fn component_imports(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("image-cache-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        });
    if let Err(e) = spawned {
        // Without the ticker no deadline fires: that is not a usable host.
        panic!("cannot start the epoch ticker thread: {e}");
    }
}

struct HasState;
impl HasData for HasState {
    type Data<'a> = &'a mut HostState;
}
impl types::Host for &mut HostState {}

/// Longest single pause `clock.sleep` grants.
pub const MAX_SLEEP: Duration = Duration::from_millis(100);

impl clock::Host for &mut HostState {
    fn now(&mut self) -> wasmtime::Result<f64> {
        Ok(crate::fs::to_time(std::time::SystemTime::now()))
    }

    /// A pause for a driver waiting on another process's lock: never longer
    /// than 100 ms or than the call has left; false once the deadline has
    /// passed, so the driver gives up (the epoch stops it soon after if it
    /// does not).
    fn sleep(&mut self, microseconds: u32) -> wasmtime::Result<bool> {
        if !crate::limits::may_wait() {
            return Ok(false);
        }
        let pause = Duration::from_micros(u64::from(microseconds))
            .min(MAX_SLEEP)
            .min(self.deadline.remaining());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        Ok(!self.deadline.passed())
    }
}

fn link(linker: &mut Linker<HostState>, grants: Grants) -> wasmtime::Result<()> {
    types::add_to_linker::<HostState, HasState>(linker, |s| s)?;
    clock::add_to_linker::<HostState, HasState>(linker, |s| s)?;
    crate::compat::v0_2::link_types_and_clock(linker)?;
    crate::fs::add_to_linker(linker, |s| FsView {
        root: &s.sandbox.root,
        table: &mut s.table,
        deadline: s.deadline,
        db: &s.sandbox.db_name,
        range_locks: &mut s.range_locks,
    })?;
    for capability in Capability::ALL {
        if !grants.allows(capability) {
            continue;
        }
        match capability {
            Capability::Xattr => crate::xattr::add_to_linker(linker, |s| XattrView {
                root: &s.sandbox.root,
                table: &mut s.table,
                support: s.sandbox.xattr,
            })?,
            Capability::Database => crate::database::add_to_linker(linker, |s| DatabaseView {
                databases: &s.sandbox.database,
                table: &mut s.table,
                deadline: s.deadline,
                connections: &mut s.connections,
                max_connections: s.max_connections,
                transactions: &mut s.transactions,
            })?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_drivers_are_builtins_or_paths() {
        assert_eq!(
            DriverSource::named(" sqlite "),
            Ok(DriverSource::Builtin("sqlite"))
        );
        assert_eq!(
            DriverSource::named("./mine.wasm"),
            Ok(DriverSource::File(PathBuf::from("./mine.wasm")))
        );
        assert_eq!(DriverSource::named("  "), Err(DriverNameError::Empty));
        let e = DriverSource::named("sqllite").unwrap_err();
        assert_eq!(e, DriverNameError::Unknown("sqllite".into()));
        assert!(
            e.to_string()
                .starts_with("unknown driver \"sqllite\": use sqlite, ")
                && e.to_string()
                    .ends_with(" or the path of a driver component (.wasm)"),
            "{e}"
        );
    }
}
