//! The VFS: SQLite's files are files of the cache root, reached through the
//! host's `fs` import; temporary files live in guest memory.
//!
//! Locks follow native SQLite's unix VFS byte for byte (the same ranges
//! around `PENDING_BYTE`, the same order of steps), on the host's POSIX
//! record locks, so a native process (Glance's sqlite driver, the `sqlite3`
//! shell) and this driver exclude each other exactly as two native
//! processes would. Each open of the database is its own open file at the
//! host, so two driver instances in one process exclude each other too.

use driver_common::fs::{self, ErrorCode, FsError, RangeLock};
use sqlite_wasm_rs::vfs::{
    AccessMode, LockLevel, MemChunksFile, OpenAccess, OpenRequest, OpenedFile, OsCallback,
    SQLiteIoMethods, SQLiteVfs, SyncOptions, VfsError, VfsErrorCode, VfsFile, VfsResult, VfsStore,
};

/// The name the VFS is registered under.
pub const NAME: &std::ffi::CStr = c"image-cache-root";

/// Native SQLite's lock bytes (`os_unix.c`): one byte past 1 GiB for
/// PENDING, the next for RESERVED, then 510 bytes SHARED readers pick from.
pub const PENDING_BYTE: u64 = 0x4000_0000;
pub const RESERVED_BYTE: u64 = PENDING_BYTE + 1;
pub const SHARED_FIRST: u64 = PENDING_BYTE + 2;
pub const SHARED_SIZE: u64 = 510;

/// Most bytes one `read-at`/`write-at` moves (the host's cap).
const MAX_IO: usize = 1 << 20;

fn vfs_error(code: VfsErrorCode, e: FsError) -> VfsError {
    let code = match e.code {
        ErrorCode::NoSpace => VfsErrorCode::Full,
        ErrorCode::AccessDenied if code == VfsErrorCode::CantOpen => VfsErrorCode::CantOpen,
        _ => code,
    };
    VfsError::new(code, e.message.into())
}

/// A file SQLite opened: one of the root's, or an anonymous one in memory.
pub enum Handle {
    Root(RootFile),
    Memory(MemChunksFile),
}

/// A file of the root, with the lock level this connection holds on it.
pub struct RootFile {
    file: fs::File,
    level: LockLevel,
    read_only: bool,
}

impl RootFile {
    fn set(&self, start: u64, len: u64, lock: RangeLock) -> VfsResult<bool> {
        self.file
            .set_range_lock(start, len, lock)
            .map_err(|e| vfs_error(VfsErrorCode::IoLock, e))
    }

    fn busy() -> VfsError {
        VfsError::new(VfsErrorCode::Busy, "the database is locked".into())
    }
}

impl VfsFile for RootFile {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> VfsResult<usize> {
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(MAX_IO) as u32;
            let got = self
                .file
                .read_at(offset + done as u64, want)
                .map_err(|e| vfs_error(VfsErrorCode::IoRead, e))?;
            if got.is_empty() {
                break;
            }
            let n = got.len().min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&got[..n]);
            done += n;
        }
        Ok(done)
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> VfsResult<()> {
        for (i, chunk) in buf.chunks(MAX_IO).enumerate() {
            self.file
                .write_at(offset + (i * MAX_IO) as u64, chunk)
                .map_err(|e| vfs_error(VfsErrorCode::IoWrite, e))?;
        }
        Ok(())
    }

    fn truncate(&mut self, size: u64) -> VfsResult<()> {
        self.file
            .set_len(size)
            .map_err(|e| vfs_error(VfsErrorCode::IoTruncate, e))
    }

    fn sync(&mut self, options: SyncOptions) -> VfsResult<()> {
        let synced = if options.data_only {
            self.file.sync_data()
        } else {
            self.file.sync()
        };
        synced.map_err(|e| vfs_error(VfsErrorCode::IoSync, e))
    }

    fn size(&self) -> VfsResult<u64> {
        self.file
            .size()
            .map_err(|e| vfs_error(VfsErrorCode::IoStat, e))
    }

    /// `unixLock`: SHARED takes PENDING for reading while it takes the
    /// SHARED range (so a writer waiting for EXCLUSIVE keeps new readers
    /// out); RESERVED takes its byte; EXCLUSIVE takes PENDING, then the
    /// whole SHARED range for writing, and keeps PENDING if that fails.
    fn lock(&mut self, level: LockLevel) -> VfsResult<()> {
        if self.level >= level {
            return Ok(());
        }
        if level == LockLevel::Shared
            || (level == LockLevel::Exclusive && self.level < LockLevel::Pending)
        {
            let kind = if level == LockLevel::Shared {
                RangeLock::Shared
            } else {
                RangeLock::Exclusive
            };
            if !self.set(PENDING_BYTE, 1, kind)? {
                return Err(Self::busy());
            }
        }
        match level {
            LockLevel::Shared => {
                // As unixLock: the temporary PENDING lock is dropped whatever
                // became of the SHARED range, and a SHARED range taken is
                // given back if that drop fails.
                let got = self.set(SHARED_FIRST, SHARED_SIZE, RangeLock::Shared);
                let dropped = self.set(PENDING_BYTE, 1, RangeLock::Unlocked);
                if let (Ok(true), Err(_)) = (&got, &dropped) {
                    let _ = self.set(SHARED_FIRST, SHARED_SIZE, RangeLock::Unlocked);
                }
                dropped?;
                if !got? {
                    return Err(Self::busy());
                }
            }
            LockLevel::Reserved => {
                if !self.set(RESERVED_BYTE, 1, RangeLock::Exclusive)? {
                    return Err(Self::busy());
                }
            }
            _ => {
                // PENDING is held from here on: a failure leaves the level
                // there, as unixLock does.
                self.level = LockLevel::Pending;
                if !self.set(SHARED_FIRST, SHARED_SIZE, RangeLock::Exclusive)? {
                    return Err(Self::busy());
                }
            }
        }
        self.level = level;
        Ok(())
    }

    /// `posixUnlock`: down to SHARED keeps the SHARED range for reading
    /// and releases PENDING and RESERVED; down to NONE releases everything.
    fn unlock(&mut self, level: LockLevel) -> VfsResult<()> {
        if self.level <= level {
            return Ok(());
        }
        if self.level > LockLevel::Shared {
            if level == LockLevel::Shared
                && !self.set(SHARED_FIRST, SHARED_SIZE, RangeLock::Shared)?
            {
                return Err(VfsError::new(
                    VfsErrorCode::IoReadLock,
                    "cannot keep the shared lock".into(),
                ));
            }
            self.set(PENDING_BYTE, 2, RangeLock::Unlocked)?;
        }
        if level == LockLevel::None {
            self.set(0, 0, RangeLock::Unlocked)?;
        }
        self.level = level;
        Ok(())
    }

    fn check_reserved_lock(&self) -> VfsResult<bool> {
        if self.level > LockLevel::Shared {
            return Ok(true);
        }
        self.file
            .range_locked_elsewhere(RESERVED_BYTE, 1)
            .map_err(|e| vfs_error(VfsErrorCode::IoCheckReservedLock, e))
    }
}

impl VfsFile for Handle {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> VfsResult<usize> {
        match self {
            Handle::Root(f) => f.read(buf, offset),
            Handle::Memory(f) => f.read(buf, offset),
        }
    }
    fn write(&mut self, buf: &[u8], offset: u64) -> VfsResult<()> {
        match self {
            Handle::Root(f) if f.read_only => Err(VfsError::new(
                VfsErrorCode::ReadOnly,
                "opened read-only".into(),
            )),
            Handle::Root(f) => f.write(buf, offset),
            Handle::Memory(f) => f.write(buf, offset),
        }
    }
    fn truncate(&mut self, size: u64) -> VfsResult<()> {
        match self {
            Handle::Root(f) => f.truncate(size),
            Handle::Memory(f) => f.truncate(size),
        }
    }
    fn sync(&mut self, options: SyncOptions) -> VfsResult<()> {
        match self {
            Handle::Root(f) => f.sync(options),
            Handle::Memory(f) => f.sync(options),
        }
    }
    fn size(&self) -> VfsResult<u64> {
        match self {
            Handle::Root(f) => f.size(),
            Handle::Memory(f) => f.size(),
        }
    }
    fn lock(&mut self, level: LockLevel) -> VfsResult<()> {
        match self {
            Handle::Root(f) => f.lock(level),
            Handle::Memory(f) => f.lock(level),
        }
    }
    fn unlock(&mut self, level: LockLevel) -> VfsResult<()> {
        match self {
            Handle::Root(f) => f.unlock(level),
            Handle::Memory(f) => f.unlock(level),
        }
    }
    fn check_reserved_lock(&self) -> VfsResult<bool> {
        match self {
            Handle::Root(f) => f.check_reserved_lock(),
            Handle::Memory(f) => f.check_reserved_lock(),
        }
    }
}

/// The file namespace: the cache root, by relative name.
pub struct RootStore;

impl VfsStore for RootStore {
    type File = Handle;
    type AppData = ();

    fn open_file(_: &(), request: OpenRequest<'_>) -> VfsResult<OpenedFile<Handle>> {
        let options = request.options;
        let Some(name) = request.filename else {
            return Ok(OpenedFile {
                file: Handle::Memory(MemChunksFile::default()),
                access: OpenAccess::ReadWrite,
            });
        };
        let path = name.path();
        let read_only = options.access() == OpenAccess::ReadOnly;
        if options.exclusive() && fs::stat(path).is_ok() {
            return Err(VfsError::new(
                VfsErrorCode::CantOpen,
                format!("{path}: already exists").into(),
            ));
        }
        let file = if read_only {
            fs::open(path)
        } else {
            fs::open_read_write(path, options.create())
        }
        .map_err(|e| vfs_error(VfsErrorCode::CantOpen, e))?;
        Ok(OpenedFile {
            file: Handle::Root(RootFile {
                file,
                level: LockLevel::None,
                read_only,
            }),
            access: options.access(),
        })
    }

    fn close_file(
        _: &(),
        name: Option<&str>,
        file: Handle,
        options: sqlite_wasm_rs::vfs::OpenOptions,
    ) -> VfsResult<()> {
        drop(file); // the host closes it, and its locks go with it
        match name {
            Some(path) if options.delete_on_close() => Self::delete_file(&(), path, false),
            _ => Ok(()),
        }
    }

    fn access(_: &(), name: &str, _mode: AccessMode) -> VfsResult<bool> {
        match fs::stat(name) {
            Ok(meta) => Ok(meta.kind == fs::EntryKind::RegularFile),
            Err(e) if e.code == ErrorCode::NotFound => Ok(false),
            Err(e) => Err(vfs_error(VfsErrorCode::IoAccess, e)),
        }
    }

    fn full_pathname(_: &(), name: &str) -> VfsResult<String> {
        // Names are relative to the root; the host checks every one.
        Ok(name.to_string())
    }

    fn delete_file(_: &(), name: &str, _sync_dir: bool) -> VfsResult<()> {
        match fs::remove_file(name) {
            Ok(()) => Ok(()),
            Err(e) if e.code == ErrorCode::NotFound => Err(VfsError::new(
                VfsErrorCode::IoDeleteNoEntry,
                e.message.into(),
            )),
            Err(e) => Err(vfs_error(VfsErrorCode::IoDelete, e)),
        }
    }
}

pub struct RootIo;
impl SQLiteIoMethods for RootIo {
    type Store = RootStore;
}

/// Time and randomness for SQLite, from the host's clock.
pub struct RootOs;

impl OsCallback for RootOs {
    fn sleep(&self, dur: std::time::Duration) {
        let micros = dur.as_micros().min(u32::MAX as u128) as u32;
        driver_common::clock::sleep(micros);
    }

    fn random(&self, buf: &mut [u8]) -> usize {
        crate::host_hooks::fill_random(buf);
        buf.len()
    }

    fn epoch_timestamp_in_ms(&self) -> VfsResult<i64> {
        Ok((driver_common::clock::now() * 1000.0) as i64)
    }
}

pub struct RootVfs;
impl SQLiteVfs<RootIo> for RootVfs {
    type Os = RootOs;
    fn os(_: &()) -> &RootOs {
        &RootOs
    }
}

/// Register the VFS once per instance (idempotent).
pub fn register() -> Result<(), String> {
    // SAFETY: an instance runs one thread; SQLite is initialised by the
    // lookup inside `register_vfs`, and the registration lives as long as
    // the instance (`into_raw`).
    unsafe {
        if sqlite_wasm_rs::vfs::registered_vfs(NAME.to_str().unwrap_or_default())
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(());
        }
        sqlite_wasm_rs::vfs::register_vfs::<RootIo, RootVfs>(
            NAME.to_str().unwrap_or_default(),
            (),
            false,
        )
        .map(|r| {
            r.into_raw();
        })
        .map_err(|e| e.to_string())
    }
}
