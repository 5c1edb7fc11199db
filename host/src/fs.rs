//! `image-cache:driver/fs`: files of one cache root, on a `cap_std` directory.
//!
//! Every path the guest gives is checked here before any system call: it must
//! be relative, without `..`, NUL or backslash. `cap_std` then resolves it
//! inside the root only (a symlink that points out is refused), and the last
//! component is never followed when it is a symlink.
//!
//! Whatever another process planted in the root, only regular files and
//! directories are opened: every open is non-blocking (a FIFO cannot hold
//! the call), then checked by `fstat` (a FIFO, socket or device is refused)
//! and by its link count (a hard link may lead to a file outside the root).
//!
//! A driver writes only its own files (`open-read-write`): the metadata
//! database at the top of the root and files in its own directories, never
//! an image's file or a fill in progress. Byte-range locks (SQLite's, inside
//! the driver) are open-file-description locks, which exclude two opens of
//! one file in one process as in two, and conflict with native SQLite's
//! POSIX locks; none outlives the driver call that took it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::fs::{
    self as wit, DirEntry, DirName, EntryKind, ErrorCode, FsError, Metadata, RangeLock,
};
use crate::limits::{DEFAULT_MAX_LISTING, Deadline};

/// Most bytes of names one listing returns (with the entry cap, what a
/// directory full of long names can make the host allocate).
pub const MAX_LISTING_BYTES: usize = 256 * 1024 * 1024;
/// Most paths one `remove-files` takes.
pub const MAX_BATCH: usize = 1_000_000;
/// Most bytes one `read-at` or `write-at` moves.
pub const MAX_IO: usize = 1 << 20;
/// Largest file a driver may make of its own (`write-at`, `set-len`).
pub const MAX_DRIVER_FILE: u64 = 16 << 30;
/// Directories whose files are images or fills: never a driver's to write.
const IMAGE_DIRS: [&str; 3] = ["incomplete", "invalid", "queue"];

/// The cache root a driver instance may use, and nothing else.
pub struct RootFs {
    dir: Dir,
    path: PathBuf,
    max_listing: usize,
}

/// A file the guest opened. The host takes it out of the resource table to
/// move image bytes natively.
#[derive(Debug)]
pub struct OpenFile {
    pub file: std::fs::File,
    /// Root-relative path it was opened at (for messages).
    pub path: String,
    /// Its size when it was opened.
    pub size_at_open: u64,
    /// Whether it was created for writing (`create-new`).
    pub writable: bool,
    /// Whether the driver may write it itself (`open-read-write`).
    pub driver_writes: bool,
    /// The driver call in which a byte-range lock was last taken on it (see
    /// [`RangeLocks`]).
    locked_in_call: std::sync::atomic::AtomicU64,
}

/// Which file an open file is: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

fn error(code: ErrorCode, message: impl Into<String>) -> FsError {
    FsError {
        code,
        message: message.into(),
    }
}

fn timed_out(what: &str) -> FsError {
    let what = if what.is_empty() { "." } else { what };
    error(
        ErrorCode::TimedOut,
        format!("{what}: stopped at the call's deadline"),
    )
}

/// An I/O error in the guest's terms, naming the path.
pub fn io_error(path: &str, e: io::Error) -> FsError {
    let code = match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
        io::ErrorKind::PermissionDenied => ErrorCode::AccessDenied,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorCode::NoSpace,
        io::ErrorKind::NotADirectory => ErrorCode::NotADirectory,
        io::ErrorKind::IsADirectory => ErrorCode::IsADirectory,
        io::ErrorKind::Unsupported => ErrorCode::Unsupported,
        _ => match e.raw_os_error() {
            Some(95) | Some(61) => ErrorCode::Unsupported, // EOPNOTSUPP, ENODATA
            Some(40) => ErrorCode::AccessDenied,           // ELOOP: a final symlink
            _ => ErrorCode::Io,
        },
    };
    let path = if path.is_empty() { "." } else { path };
    error(code, format!("{path}: {e}"))
}

/// Check a guest path before it reaches the system: relative, no `..`, no
/// NUL or backslash. The empty path and `.` name the root itself.
pub fn check_path(path: &str) -> Result<&Path> {
    if path.contains(['\0', '\\']) {
        return Err(error(
            ErrorCode::InvalidPath,
            format!("{path:?}: NUL or backslash in a path"),
        ));
    }
    let p = Path::new(path);
    for component in p.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(error(
                    ErrorCode::AccessDenied,
                    format!("{path:?}: `..` is not allowed"),
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(error(
                    ErrorCode::AccessDenied,
                    format!("{path:?}: absolute paths are not allowed"),
                ));
            }
        }
    }
    Ok(if path.is_empty() { Path::new(".") } else { p })
}

/// Like [`check_path`], for operations that need a name, not the root.
fn check_name(path: &str) -> Result<&Path> {
    let p = check_path(path)?;
    if p.components().all(|c| c == Component::CurDir) {
        return Err(error(
            ErrorCode::InvalidPath,
            format!("{path:?} names the root, not a file"),
        ));
    }
    Ok(p)
}

/// Seconds since the Unix epoch; a time before it reads as 0.
pub fn to_time(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Latest time a guest may set: the year 33658 (Glance stores floats; the
/// kernel takes far more, cap-std and std panic on far less than f64 holds).
pub const MAX_TIME: f64 = 1e12;

/// A guest's time, checked before it reaches any library that could panic
/// on it: finite, not before 1970, not absurdly far ahead.
pub fn from_time(t: f64) -> Result<SystemTime> {
    if !t.is_finite() || !(0.0..=MAX_TIME).contains(&t) {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!("{t} is not a usable time (seconds since 1970, at most {MAX_TIME})"),
        ));
    }
    Ok(UNIX_EPOCH + Duration::from_secs_f64(t))
}

/// Refuse what is not a regular file with one link: a directory, a FIFO,
/// socket or device (planted to block or confuse the host), or a file with
/// other hard links (one may be outside the root).
fn regular(path: &str, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if meta.is_dir() {
        return Err(error(
            ErrorCode::IsADirectory,
            format!("{path}: not a regular file"),
        ));
    }
    if !meta.is_file() {
        return Err(error(
            ErrorCode::AccessDenied,
            format!("{path}: not a regular file"),
        ));
    }
    if meta.nlink() > 1 {
        return Err(error(
            ErrorCode::AccessDenied,
            format!(
                "{path}: has {} hard links; refused (it may be a link to a file outside the root)",
                meta.nlink()
            ),
        ));
    }
    Ok(())
}

/// The kind of an entry, from what std's or cap-std's file type says.
fn kind(symlink: bool, file: bool, dir: bool) -> EntryKind {
    match (symlink, file, dir) {
        (true, _, _) => EntryKind::Symlink,
        (_, true, _) => EntryKind::RegularFile,
        (_, _, true) => EntryKind::Directory,
        _ => EntryKind::Other,
    }
}

fn metadata_of(m: &std::fs::Metadata) -> Metadata {
    Metadata {
        kind: {
            let ft = m.file_type();
            kind(ft.is_symlink(), ft.is_file(), ft.is_dir())
        },
        size: m.len(),
        accessed: m.accessed().map(to_time).unwrap_or(0.0),
        modified: m.modified().map(to_time).unwrap_or(0.0),
    }
}

fn cap_metadata(m: &cap_std::fs::Metadata) -> Metadata {
    let ft = m.file_type();
    let time =
        |t: io::Result<cap_std::time::SystemTime>| t.map(|t| to_time(t.into_std())).unwrap_or(0.0);
    Metadata {
        kind: kind(ft.is_symlink(), ft.is_file(), ft.is_dir()),
        size: m.len(),
        accessed: time(m.accessed()),
        modified: time(m.modified()),
    }
}

impl RootFs {
    /// Open the root directory at `path` (which must exist).
    pub fn new(path: &Path) -> io::Result<RootFs> {
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority())?;
        Ok(RootFs {
            dir,
            path: path.to_path_buf(),
            max_listing: DEFAULT_MAX_LISTING,
        })
    }

    pub fn with_max_listing(mut self, max: usize) -> Self {
        self.max_listing = max;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Open `path` without blocking and without following a final
    /// symlink, then keep it only if it is a regular file with one link.
    fn open_regular(&self, path: &str, options: &mut OpenOptions) -> Result<OpenFile> {
        let p = check_name(path)?;
        options
            .follow(FollowSymlinks::No)
            .custom_flags(libc::O_NONBLOCK);
        let file = self
            .dir
            .open_with(p, options)
            .map_err(|e| io_error(path, e))?
            .into_std();
        let meta = file.metadata().map_err(|e| io_error(path, e))?;
        regular(path, &meta)?;
        // Regular files ignore O_NONBLOCK; clear it all the same.
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        Ok(OpenFile {
            file,
            path: path.to_string(),
            size_at_open: meta.len(),
            writable: false,
            driver_writes: false,
            locked_in_call: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn create_new(&self, path: &str) -> Result<OpenFile> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        let mut file = self.open_regular(path, &mut options)?;
        file.writable = true;
        Ok(file)
    }

    pub fn open(&self, path: &str) -> Result<OpenFile> {
        self.open_regular(path, OpenOptions::new().read(true))
    }

    /// Open a file of the driver's own for reading and writing (creating it
    /// if `create`): at the top of the root only the metadata database
    /// `db` and its journal (or the WAL a database of release 0.2 left),
    /// nothing in the image directories.
    pub fn open_read_write(&self, path: &str, create: bool, db: &str) -> Result<OpenFile> {
        let p = check_name(path)?;
        let mut parts = p.components().filter(|c| *c != Component::CurDir);
        let first = parts.next().map(|c| c.as_os_str().to_string_lossy());
        let top_level = parts.next().is_none();
        let first = first.as_deref().unwrap_or_default();
        let allowed = if top_level {
            first == db
                || first
                    .strip_prefix(db)
                    .is_some_and(|rest| rest == "-journal" || rest == "-wal")
        } else {
            !IMAGE_DIRS.contains(&first)
        };
        if !allowed {
            return Err(error(
                ErrorCode::AccessDenied,
                format!(
                    "{path}: not a file a driver may write (at the top of the root only the \
                     metadata database {db} and its journal; nothing under {})",
                    IMAGE_DIRS.join("/, ") + "/"
                ),
            ));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(create);
        let mut file = self.open_regular(path, &mut options)?;
        file.driver_writes = true;
        Ok(file)
    }

    pub fn stat(&self, path: &str) -> Result<Metadata> {
        let p = check_path(path)?;
        let meta = if p == Path::new(".") {
            self.dir.dir_metadata()
        } else {
            self.dir.symlink_metadata(p)
        };
        meta.map(|m| cap_metadata(&m))
            .map_err(|e| io_error(path, e))
    }

    /// The identity of the regular file at `path` (never through a final
    /// symlink), or why there is none.
    pub fn identity(&self, path: &str) -> Result<FileIdentity> {
        use cap_std::fs::MetadataExt;
        let p = check_name(path)?;
        let meta = self
            .dir
            .symlink_metadata(p)
            .map_err(|e| io_error(path, e))?;
        if !meta.is_file() {
            return Err(error(
                ErrorCode::IsADirectory,
                format!("{path}: not a regular file"),
            ));
        }
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    pub fn create_dir(&self, path: &str) -> Result<()> {
        let p = check_name(path)?;
        self.dir.create_dir(p).map_err(|e| io_error(path, e))
    }

    /// Walk a directory's entries (not `.` or `..`), at most `max_listing`
    /// of them; `describe` turns one into a listing item, or `None` to skip
    /// it. Names that are not UTF-8 are skipped (never an image id), and so
    /// are entries removed while the directory is read.
    fn walk<T>(
        &self,
        path: &str,
        deadline: Option<Deadline>,
        describe: impl Fn(&cap_std::fs::DirEntry, String) -> io::Result<T>,
    ) -> Result<Vec<T>> {
        let p = check_path(path)?;
        let entries = if p == Path::new(".") {
            self.dir.entries()
        } else {
            self.dir.read_dir(p)
        }
        .map_err(|e| io_error(path, e))?;
        let mut listing = Vec::new();
        let mut name_bytes = 0usize;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(path, e))?;
            if listing.len() >= self.max_listing {
                return Err(error(
                    ErrorCode::LimitExceeded,
                    format!("{path}: more than {} entries", self.max_listing),
                ));
            }
            if listing.len() % 1024 == 1023 && deadline.is_some_and(|d| d.passed()) {
                return Err(timed_out(path));
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            name_bytes += name.len();
            if name_bytes > MAX_LISTING_BYTES {
                return Err(error(
                    ErrorCode::LimitExceeded,
                    format!("{path}: more than {MAX_LISTING_BYTES} bytes of names"),
                ));
            }
            match describe(&entry, name.clone()) {
                Ok(item) => listing.push(item),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&format!("{path}/{name}"), e)),
            }
        }
        Ok(listing)
    }

    /// Every entry with its metadata (a stat per entry).
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        self.list_dir_until(path, None)
    }

    /// Like [`RootFs::list_dir`], stopping at `deadline`.
    pub fn list_dir_until(&self, path: &str, deadline: Option<Deadline>) -> Result<Vec<DirEntry>> {
        self.walk(path, deadline, |entry, name| {
            Ok(DirEntry {
                name,
                metadata: cap_metadata(&entry.metadata()?),
            })
        })
    }

    /// Every entry's name and kind; the kind comes from the listing itself
    /// (d_type) where the file system reports it.
    pub fn list_names(&self, path: &str) -> Result<Vec<DirName>> {
        self.list_names_until(path, None)
    }

    /// Like [`RootFs::list_names`], stopping at `deadline`.
    pub fn list_names_until(&self, path: &str, deadline: Option<Deadline>) -> Result<Vec<DirName>> {
        self.walk(path, deadline, |entry, name| {
            let ft = entry.file_type()?;
            Ok(DirName {
                name,
                kind: kind(ft.is_symlink(), ft.is_file(), ft.is_dir()),
            })
        })
    }

    /// Rename within the root, where images cannot be forged by moving
    /// files: into the top of the root only `incomplete/<name>` to
    /// `<name>` (a commit), and `incomplete/<name>` otherwise only to
    /// `invalid/<name>` (an abort); nothing leaves the top of the root or
    /// moves into `incomplete/` or `queue/`. So the bytes at `<id>` are
    /// always a file the host filled: never one the driver wrote
    /// (`open-read-write`) nor another image's.
    pub fn rename(&self, src: &str, dst: &str) -> Result<()> {
        let (s, d) = (check_name(src)?, check_name(dst)?);
        let parts = |p: &Path| -> Vec<String> {
            p.components()
                .filter(|c| *c != Component::CurDir)
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect()
        };
        let (sp, dp) = (parts(s), parts(d));
        let from_incomplete = |name: &str| sp.len() == 2 && sp[0] == "incomplete" && sp[1] == name;
        let allowed = match (sp.as_slice(), dp.as_slice()) {
            (_, [name]) => from_incomplete(name),
            ([_], _) => false,
            (_, [dir, ..]) if dir == "incomplete" || dir == "queue" => false,
            ([dir, ..], [to, name]) if dir == "incomplete" || dir == "queue" => {
                to == "invalid" && from_incomplete(name)
            }
            ([dir, ..], _) if dir == "incomplete" || dir == "queue" => false,
            _ => true,
        };
        if !allowed {
            return Err(error(
                ErrorCode::AccessDenied,
                format!(
                    "{src} -> {dst}: not a rename a driver may make (into the top of the root \
                     only incomplete/<name> -> <name>, out of incomplete/ only to \
                     invalid/<name>; nothing leaves the top of the root)"
                ),
            ));
        }
        self.dir
            .rename(s, &self.dir, d)
            .map_err(|e| io_error(&format!("{src} -> {dst}"), e))
    }

    pub fn remove_file(&self, path: &str) -> Result<()> {
        let p = check_name(path)?;
        self.dir.remove_file(p).map_err(|e| io_error(path, e))
    }

    pub fn set_times(
        &self,
        path: &str,
        accessed: Option<f64>,
        modified: Option<f64>,
    ) -> Result<()> {
        let p = check_name(path)?;
        let spec = |t: Option<f64>| -> Result<Option<cap_fs_ext::SystemTimeSpec>> {
            t.map(|t| {
                from_time(t).map(|t| {
                    cap_fs_ext::SystemTimeSpec::Absolute(cap_std::time::SystemTime::from_std(t))
                })
            })
            .transpose()
        };
        self.dir
            .set_symlink_times(p, spec(accessed)?, spec(modified)?)
            .map_err(|e| io_error(path, e))
    }
}

impl OpenFile {
    pub fn metadata(&self) -> Result<Metadata> {
        self.file
            .metadata()
            .map(|m| metadata_of(&m))
            .map_err(|e| io_error(&self.path, e))
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| io_error(&self.path, e))
    }

    pub fn set_times(&self, accessed: Option<f64>, modified: Option<f64>) -> Result<()> {
        let mut times = std::fs::FileTimes::new();
        if let Some(t) = accessed {
            times = times.set_accessed(from_time(t)?);
        }
        if let Some(t) = modified {
            times = times.set_modified(from_time(t)?);
        }
        self.file
            .set_times(times)
            .map_err(|e| io_error(&self.path, e))
    }

    pub fn identity(&self) -> io::Result<FileIdentity> {
        Ok(FileIdentity::of(&self.file.metadata()?))
    }

    /// Take the exclusive lock, waiting for other holders until `deadline`
    /// (never longer: a blocking `flock` could not be interrupted).
    pub fn lock(&self, deadline: Deadline) -> Result<()> {
        let mut pause = Duration::from_micros(200);
        loop {
            match self.try_lock()? {
                true => return Ok(()),
                false if deadline.passed() || !crate::limits::may_wait() => {
                    return Err(error(
                        ErrorCode::TimedOut,
                        format!(
                            "{}: another holder kept the lock until the call's deadline",
                            self.path
                        ),
                    ));
                }
                false => {
                    std::thread::sleep(pause.min(deadline.remaining()));
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn try_lock(&self) -> Result<bool> {
        match self.file.try_lock() {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(io_error(&self.path, e)),
        }
    }

    pub fn unlock(&self) -> Result<()> {
        self.file.unlock().map_err(|e| io_error(&self.path, e))
    }

    pub fn size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io_error(&self.path, e))
    }

    fn refuse_driver_write(&self) -> Result<()> {
        match self.driver_writes {
            true => Ok(()),
            false => Err(error(
                ErrorCode::AccessDenied,
                format!(
                    "{}: not opened with open-read-write (only the host writes an image's bytes)",
                    self.path
                ),
            )),
        }
    }

    /// Up to `length` bytes (at most [`MAX_IO`]) from `offset`.
    pub fn read_at(&self, offset: u64, length: u32) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let length = length as usize;
        if length > MAX_IO {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("{}: more than {MAX_IO} bytes in one read", self.path),
            ));
        }
        span(&self.path, offset, length as u64)?;
        let mut buf = vec![0; length];
        let mut done = 0;
        while done < length {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(&self.path, e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Write all of `data` (at most [`MAX_IO`] bytes) at `offset`, in a file
    /// the driver may write, never past [`MAX_DRIVER_FILE`].
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.refuse_driver_write()?;
        if data.len() > MAX_IO {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("{}: more than {MAX_IO} bytes in one write", self.path),
            ));
        }
        within_driver_cap(&self.path, span(&self.path, offset, data.len() as u64)?)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_error(&self.path, e))
    }

    pub fn set_len(&self, size: u64) -> Result<()> {
        self.refuse_driver_write()?;
        within_driver_cap(&self.path, size)?;
        self.file.set_len(size).map_err(|e| io_error(&self.path, e))
    }

    pub fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| io_error(&self.path, e))
    }

    /// One open-file-description lock call (`F_OFD_SETLK`/`F_OFD_GETLK`).
    fn ofd_lock(&self, cmd: i32, kind: i32, start: u64, length: u64) -> Result<libc::flock> {
        span(&self.path, start, length)?;
        // SAFETY: a zeroed flock is a valid value; every field is set below.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = kind as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = start as libc::off_t;
        lock.l_len = length as libc::off_t;
        lock.l_pid = 0;
        // SAFETY: fcntl with a valid descriptor and a flock this frame owns.
        if unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &mut lock) } == 0 {
            return Ok(lock);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                lock.l_type = -1; // held elsewhere
                Ok(lock)
            }
            _ => Err(io_error(&self.path, e)),
        }
    }

    /// Set a byte-range lock without waiting; false if another open file
    /// holds a conflicting one. `length` 0 reaches past the end of file.
    pub fn set_range_lock(&self, start: u64, length: u64, lock: RangeLock) -> Result<bool> {
        let kind = match lock {
            RangeLock::Unlocked => libc::F_UNLCK,
            RangeLock::Shared => libc::F_RDLCK,
            RangeLock::Exclusive => libc::F_WRLCK,
        };
        let done = self.ofd_lock(libc::F_OFD_SETLK, kind, start, length)?;
        Ok(done.l_type != -1)
    }

    /// Whether another open file holds a lock on the range that conflicts
    /// with an exclusive one.
    pub fn range_locked_elsewhere(&self, start: u64, length: u64) -> Result<bool> {
        let probe = self.ofd_lock(libc::F_OFD_GETLK, libc::F_WRLCK, start, length)?;
        Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
    }
}

/// The end of `length` bytes from `offset`, if it fits a file offset.
fn span(path: &str, offset: u64, length: u64) -> Result<u64> {
    offset
        .checked_add(length)
        .filter(|end| *end <= i64::MAX as u64)
        .ok_or_else(|| {
            error(
                ErrorCode::InvalidArgument,
                format!("{path}: {length} bytes at offset {offset} are past any file offset"),
            )
        })
}

fn within_driver_cap(path: &str, end: u64) -> Result<()> {
    match end <= MAX_DRIVER_FILE {
        true => Ok(()),
        false => Err(error(
            ErrorCode::LimitExceeded,
            format!("{path}: a driver's own file may not grow past {MAX_DRIVER_FILE} bytes"),
        )),
    }
}

/// Files that took a byte-range lock during the current driver call, kept
/// open (a duplicate descriptor of the same open file) until the call ends,
/// when every lock they hold is released: a lock never outlives the call
/// that took it, so a driver cannot keep other processes (or its own
/// other instances) out of a database between calls.
pub struct RangeLocks {
    /// The current driver call, counted from 1 (0 marks a file that never
    /// took a range lock).
    call: u64,
    held: Vec<OwnedFd>,
}

impl Default for RangeLocks {
    fn default() -> Self {
        RangeLocks {
            call: 1,
            held: Vec::new(),
        }
    }
}

impl RangeLocks {
    /// Remember `file`'s open file description for release at the end of
    /// the call (once per file and call).
    fn note(&mut self, file: &OpenFile) -> Result<()> {
        use std::sync::atomic::Ordering;
        if file.locked_in_call.load(Ordering::Relaxed) == self.call {
            return Ok(());
        }
        let dup = file.file.try_clone().map_err(|e| io_error(&file.path, e))?;
        self.held.push(dup.into());
        // Marked only once its release is certain.
        file.locked_in_call.store(self.call, Ordering::Relaxed);
        Ok(())
    }

    /// The driver call ended: release every range lock taken during it.
    pub fn release_all(&mut self) {
        for fd in self.held.drain(..) {
            // SAFETY: a zeroed flock is valid; F_UNLCK over the whole file
            // on a descriptor this struct owns.
            unsafe {
                let mut lock: libc::flock = std::mem::zeroed();
                lock.l_type = libc::F_UNLCK as libc::c_short;
                lock.l_whence = libc::SEEK_SET as libc::c_short;
                libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &mut lock);
            }
        }
        self.call += 1;
    }
}

/// What the `fs` host functions borrow from a store.
pub struct FsView<'a> {
    pub root: &'a RootFs,
    pub table: &'a mut ResourceTable,
    /// The deadline of the driver call this import is part of.
    pub deadline: Deadline,
    /// The metadata database's name (`image_cache_sqlite_db`), the one file
    /// at the top of the root (with its journal) a driver may write.
    pub db: &'a str,
    pub range_locks: &'a mut RangeLocks,
}

impl FsView<'_> {
    fn push(&mut self, file: OpenFile) -> wasmtime::Result<Resource<OpenFile>> {
        Ok(self.table.push(file)?)
    }

    fn opened(&mut self, file: Result<OpenFile>) -> wasmtime::Result<Result<Resource<OpenFile>>> {
        Ok(match file {
            Ok(file) => Ok(self.push(file)?),
            Err(e) => Err(e),
        })
    }
}

impl wit::Host for FsView<'_> {
    fn create_new(&mut self, path: String) -> wasmtime::Result<Result<Resource<OpenFile>>> {
        let file = self.root.create_new(&path);
        self.opened(file)
    }

    fn open(&mut self, path: String) -> wasmtime::Result<Result<Resource<OpenFile>>> {
        let file = self.root.open(&path);
        self.opened(file)
    }

    fn open_read_write(
        &mut self,
        path: String,
        create: bool,
    ) -> wasmtime::Result<Result<Resource<OpenFile>>> {
        let file = self.root.open_read_write(&path, create, self.db);
        self.opened(file)
    }

    fn stat(&mut self, path: String) -> wasmtime::Result<Result<Metadata>> {
        Ok(self.root.stat(&path))
    }

    fn create_dir(&mut self, path: String) -> wasmtime::Result<Result<()>> {
        Ok(self.root.create_dir(&path))
    }

    fn list_dir(&mut self, path: String) -> wasmtime::Result<Result<Vec<DirEntry>>> {
        Ok(self.root.list_dir_until(&path, Some(self.deadline)))
    }

    fn list_names(&mut self, path: String) -> wasmtime::Result<Result<Vec<DirName>>> {
        Ok(self.root.list_names_until(&path, Some(self.deadline)))
    }

    fn rename(&mut self, src: String, dst: String) -> wasmtime::Result<Result<()>> {
        Ok(self.root.rename(&src, &dst))
    }

    fn remove_file(&mut self, path: String) -> wasmtime::Result<Result<()>> {
        Ok(self.root.remove_file(&path))
    }

    fn remove_files(&mut self, paths: Vec<String>) -> wasmtime::Result<Vec<Result<()>>> {
        if paths.len() > MAX_BATCH {
            let e = error(
                ErrorCode::LimitExceeded,
                format!("more than {MAX_BATCH} paths in one call"),
            );
            return Ok(vec![Err(e); paths.len()]);
        }
        let mut stopped = false;
        let mut results = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            stopped = stopped || (i % 256 == 255 && self.deadline.passed());
            results.push(match stopped {
                true => Err(timed_out(p)),
                false => self.root.remove_file(p),
            });
        }
        Ok(results)
    }

    fn set_times(
        &mut self,
        path: String,
        accessed: Option<f64>,
        modified: Option<f64>,
    ) -> wasmtime::Result<Result<()>> {
        Ok(self.root.set_times(&path, accessed, modified))
    }
}

impl wit::HostFile for FsView<'_> {
    fn metadata(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<Metadata>> {
        Ok(self.table.get(&f)?.metadata())
    }

    fn sync(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&f)?.sync())
    }

    fn set_times(
        &mut self,
        f: Resource<OpenFile>,
        accessed: Option<f64>,
        modified: Option<f64>,
    ) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&f)?.set_times(accessed, modified))
    }

    fn lock(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<()>> {
        let deadline = self.deadline;
        Ok(self.table.get(&f)?.lock(deadline))
    }

    fn try_lock(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<bool>> {
        Ok(self.table.get(&f)?.try_lock())
    }

    fn unlock(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&f)?.unlock())
    }

    fn size(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<u64>> {
        Ok(self.table.get(&f)?.size())
    }

    fn read_at(
        &mut self,
        f: Resource<OpenFile>,
        offset: u64,
        length: u32,
    ) -> wasmtime::Result<Result<Vec<u8>>> {
        Ok(self.table.get(&f)?.read_at(offset, length))
    }

    fn write_at(
        &mut self,
        f: Resource<OpenFile>,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&f)?.write_at(offset, &data))
    }

    fn set_len(&mut self, f: Resource<OpenFile>, size: u64) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&f)?.set_len(size))
    }

    fn sync_data(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&f)?.sync_data())
    }

    fn set_range_lock(
        &mut self,
        f: Resource<OpenFile>,
        start: u64,
        length: u64,
        lock: RangeLock,
    ) -> wasmtime::Result<Result<bool>> {
        let file = self.table.get(&f)?;
        if lock != RangeLock::Unlocked
            && let Err(e) = self.range_locks.note(file)
        {
            return Ok(Err(e));
        }
        Ok(file.set_range_lock(start, length, lock))
    }

    fn range_locked_elsewhere(
        &mut self,
        f: Resource<OpenFile>,
        start: u64,
        length: u64,
    ) -> wasmtime::Result<Result<bool>> {
        Ok(self.table.get(&f)?.range_locked_elsewhere(start, length))
    }

    fn drop(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<()> {
        self.table.delete(f)?;
        Ok(())
    }
}

struct HasFs;

impl HasData for HasFs {
    type Data<'a> = FsView<'a>;
}

/// Add the `fs` interface to a linker; `view` borrows it from the store.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> FsView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasFs>(linker, view)?;
    // Contract 0.2.0's names, served by the same functions.
    crate::compat::v0_2::link_fs(linker, view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, RootFs) {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn refuses_parent_and_absolute_paths_before_any_system_call() {
        let (_dir, root) = root();
        for path in ["..", "../x", "a/../../x", "/etc/passwd", "/"] {
            let e = root.open(path).unwrap_err();
            assert_eq!(e.code, ErrorCode::AccessDenied, "{path}: {}", e.message);
            assert_eq!(
                root.create_new(path).unwrap_err().code,
                ErrorCode::AccessDenied,
                "{path}"
            );
            assert_eq!(
                root.stat(path).unwrap_err().code,
                ErrorCode::AccessDenied,
                "{path}"
            );
            assert_eq!(
                root.remove_file(path).unwrap_err().code,
                ErrorCode::AccessDenied,
                "{path}"
            );
            assert_eq!(
                root.list_dir(path).unwrap_err().code,
                ErrorCode::AccessDenied,
                "{path}"
            );
            assert_eq!(
                root.rename("x", path).unwrap_err().code,
                ErrorCode::AccessDenied,
                "{path}"
            );
        }
        for path in ["a\\b", "nul\0"] {
            assert_eq!(
                root.open(path).unwrap_err().code,
                ErrorCode::InvalidPath,
                "{path:?}"
            );
        }
        assert_eq!(
            root.create_new("").unwrap_err().code,
            ErrorCode::InvalidPath
        );
        assert_eq!(
            root.remove_file(".").unwrap_err().code,
            ErrorCode::InvalidPath
        );
    }

    #[test]
    fn never_follows_a_symlink_out_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let (dir, root) = root();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();

        // The final component is never followed.
        assert!(root.open("link").is_err());
        assert_eq!(root.stat("link").unwrap().kind, EntryKind::Symlink);
        assert!(
            root.set_times("link", Some(0.0), None).is_ok(),
            "sets the link's own times"
        );
        assert!(
            std::fs::metadata(outside.path().join("secret"))
                .unwrap()
                .accessed()
                .unwrap()
                > UNIX_EPOCH
        );
        // A directory symlink leading out is refused at every use.
        assert!(root.open("linkdir/secret").is_err());
        assert!(root.create_new("linkdir/planted").is_err());
        assert!(root.list_dir("linkdir").is_err());
        assert!(root.remove_file("linkdir/secret").is_err());
        assert!(root.rename("linkdir/secret", "stolen").is_err());
        assert!(!outside.path().join("planted").exists());
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"secret"
        );
        // Removing the link removes the link, not its target.
        root.remove_file("link").unwrap();
        assert!(outside.path().join("secret").exists());
    }

    #[test]
    fn create_new_is_exclusive() {
        let (_dir, root) = root();
        let _first = root.create_new("incomplete-x").unwrap();
        assert_eq!(
            root.create_new("incomplete-x").unwrap_err().code,
            ErrorCode::AlreadyExists
        );
    }

    #[test]
    fn listing_is_capped() {
        let (dir, root) = root();
        for i in 0..5 {
            std::fs::write(dir.path().join(i.to_string()), b"").unwrap();
        }
        assert_eq!(root.list_dir("").unwrap().len(), 5);
        let capped = RootFs::new(dir.path()).unwrap().with_max_listing(3);
        assert_eq!(
            capped.list_dir("").unwrap_err().code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn times_round_trip_with_sub_second_precision() {
        let (_dir, root) = root();
        let file = root.create_new("f").unwrap();
        file.set_times(Some(1_700_000_000.25), Some(1_600_000_000.5))
            .unwrap();
        let meta = root.stat("f").unwrap();
        assert_eq!(
            (meta.accessed, meta.modified),
            (1_700_000_000.25, 1_600_000_000.5)
        );
        file.set_times(Some(1_700_000_001.0), None).unwrap();
        assert_eq!(
            file.metadata().unwrap().modified,
            1_600_000_000.5,
            "none leaves it unchanged"
        );
    }
}
