//! The wasmtime side: one engine per process, driver components loaded and
//! pre-instantiated once, and stores with limits for each driver instance.
//!
//! - The engine has the component model and epoch interruption on; a ticker
//!   thread advances the epoch and stops when the engine is dropped (it only
//!   holds a weak reference).
//! - Compiled components are kept in an artifact directory outside any cache
//!   root, keyed by the component's SHA-256 and the engine's settings, so a
//!   second start does not compile again.
//! - A component may import only the contract (`image-cache:driver/*`) and
//!   what Rust's std needs on wasm32-wasip2; anything else is refused at load.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::{DriverPre, types};
use crate::error::{Error, Result};
use crate::fs::{FsView, RootFs};
use crate::sqlite::{SqliteRoot, SqliteView};
use crate::xattr::{XattrSupport, XattrView};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Interface prefixes a driver component may import.
pub const ALLOWED_IMPORTS: &[&str] = &[
    "image-cache:driver/",
    "wasi:cli/environment@",
    "wasi:cli/exit@",
    "wasi:cli/stdin@",
    "wasi:cli/stdout@",
    "wasi:cli/stderr@",
    "wasi:cli/terminal-",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:io/",
];

/// Limits for every driver instance.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest a single driver call may run before it is interrupted.
    pub call_deadline: Duration,
    /// Most linear memory one instance may have.
    pub memory_bytes: usize,
    /// Most host resources (open files, connections) one instance may hold.
    pub resources: usize,
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
            max_listing: crate::fs::DEFAULT_MAX_LISTING,
            max_query_bytes: crate::sqlite::DEFAULT_MAX_RESULT_BYTES,
        }
    }
}

/// What a store of a driver instance holds.
pub struct HostState {
    pub(crate) table: ResourceTable,
    wasi: WasiCtx,
    root: Arc<RootFs>,
    sqlite: Arc<SqliteRoot>,
    xattr: XattrSupport,
    limits: StoreLimits,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
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

/// The engine, the shared linker and the artifact directory.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    artifacts: Option<PathBuf>,
    limits: Limits,
    /// Components loaded so far, by SHA-256: each is compiled once.
    components: std::sync::Mutex<std::collections::HashMap<String, Arc<DriverComponent>>>,
    pub stats: RuntimeStats,
}

/// Where a driver component comes from.
#[derive(Clone, Debug)]
pub enum DriverSource {
    /// One of the drivers built into this binary.
    Builtin(&'static str),
    /// A component file, e.g. a third party's driver.
    File(PathBuf),
}

impl DriverSource {
    /// `sqlite`, `xattr`, or a path to a component file.
    pub fn parse(spec: &str) -> DriverSource {
        match crate::builtin::find(spec) {
            Some(b) => DriverSource::Builtin(b.name),
            None => DriverSource::File(PathBuf::from(spec)),
        }
    }

    pub fn name(&self) -> String {
        match self {
            DriverSource::Builtin(name) => name.to_string(),
            DriverSource::File(path) => path.display().to_string(),
        }
    }
}

/// A compiled driver component, ready to instantiate.
pub struct DriverComponent {
    name: String,
    pre: DriverPre<HostState>,
    sha256: String,
    precompiled: bool,
}

impl DriverComponent {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether it came from the artifact directory (no compilation).
    pub fn was_precompiled(&self) -> bool {
        self.precompiled
    }

    pub(crate) fn pre(&self) -> &DriverPre<HostState> {
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

impl Runtime {
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

        let mut linker = Linker::<HostState>::new(&engine);
        link(&mut linker).map_err(|e| load_error("linker", e))?;
        Ok(Arc::new(Runtime {
            engine,
            linker,
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

    /// The driver component from `source`, loaded once per content.
    pub fn component(&self, source: &DriverSource) -> Result<Arc<DriverComponent>> {
        let bytes = self.read_source(source)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if let Some(c) = self.components.lock().unwrap().get(&sha256) {
            return Ok(c.clone());
        }
        let component = Arc::new(self.load_bytes(&source.name(), &bytes)?);
        self.components
            .lock()
            .unwrap()
            .insert(sha256, component.clone());
        Ok(component)
    }

    fn read_source(&self, source: &DriverSource) -> Result<std::borrow::Cow<'static, [u8]>> {
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

    /// Load (compile or fetch from the artifact directory) and
    /// pre-instantiate a driver component, without memoizing it.
    pub fn load(&self, source: &DriverSource) -> Result<DriverComponent> {
        let bytes = self.read_source(source)?;
        self.load_bytes(&source.name(), &bytes)
    }

    /// The interfaces the component from `source` imports, whether or not
    /// the cache would accept it (compiled through the artifact directory,
    /// so this is cheap after the first time).
    pub fn imports(&self, source: &DriverSource) -> Result<Vec<String>> {
        let bytes = self.read_source(source)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let (component, _) = self.compile(&source.name(), &sha256, &bytes)?;
        Ok(component_imports(&self.engine, &component))
    }

    /// Like [`Runtime::load`], from the component's bytes.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<DriverComponent> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let (component, precompiled) = self.compile(name, &sha256, bytes)?;
        check_imports(&self.engine, name, &component)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| load_error(name, e))?;
        let pre = DriverPre::new(instance_pre).map_err(|e| load_error(name, e))?;
        Ok(DriverComponent {
            name: name.to_string(),
            pre,
            sha256,
            precompiled,
        })
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
        if let Some(path) = artifact {
            if let Err(e) = save_artifact(&component, &path) {
                log::warn!(
                    "driver {name}: cannot keep compiled artifact {}: {e}",
                    path.display()
                );
            }
        }
        Ok((component, false))
    }

    /// A store for one driver instance on `root`.
    pub(crate) fn store(
        &self,
        root: &Arc<RootFs>,
        sqlite: &Arc<SqliteRoot>,
        xattr: XattrSupport,
    ) -> Store<HostState> {
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.limits.resources);
        let wasi = WasiCtx::builder()
            .inherit_stderr()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                table,
                wasi,
                root: root.clone(),
                sqlite: sqlite.clone(),
                xattr,
                limits,
            },
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.deadline_ticks());
        store
    }

    pub(crate) fn deadline_ticks(&self) -> u64 {
        (self.limits.call_deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

fn load_error(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Load {
        driver: name.to_string(),
        message: format!("{e:#}"),
    }
}

fn save_artifact(component: &Component, path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().expect("artifact path has a directory");
    std::fs::create_dir_all(dir)?;
    static TEMPS: AtomicU64 = AtomicU64::new(0);
    let temp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        TEMPS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&temp, component.serialize()?)?;
    std::fs::rename(&temp, path)?;
    Ok(())
}

/// Refuse a component that imports anything beyond the contract.
fn check_imports(engine: &Engine, name: &str, component: &Component) -> Result<()> {
    let ty = component.component_type();
    for (import, _) in ty.imports(engine) {
        if !ALLOWED_IMPORTS.iter().any(|p| import.starts_with(p)) {
            return Err(Error::Load {
                driver: name.to_string(),
                message: format!("it imports {import}, which a driver may not use"),
            });
        }
    }
    Ok(())
}

/// The names a component imports.
pub fn component_imports(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("image-cache-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .expect("cannot start the epoch ticker thread");
}

struct HasTypes;
impl wasmtime::component::HasData for HasTypes {
    type Data<'a> = &'a mut HostState;
}
impl types::Host for &mut HostState {}

fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // What Rust's std needs; the context has no preopens and no network, and
    // check_imports keeps components from importing filesystem or sockets.
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    types::add_to_linker::<HostState, HasTypes>(linker, |s| s)?;
    crate::fs::add_to_linker(linker, |s| FsView {
        root: &s.root,
        table: &mut s.table,
    })?;
    crate::xattr::add_to_linker(linker, |s| XattrView {
        root: &s.root,
        table: &mut s.table,
        support: s.xattr,
    })?;
    crate::sqlite::add_to_linker(linker, |s| SqliteView {
        sqlite: &s.sqlite,
        root: &s.root,
        table: &mut s.table,
    })?;
    Ok(())
}
