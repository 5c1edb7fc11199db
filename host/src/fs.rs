//! `image-cache:driver/fs`: files of one cache root, on a `cap_std` directory.
//!
//! Every path the guest gives is checked here before any system call: it must
//! be relative, without `..`, NUL or backslash. `cap_std` then resolves it
//! inside the root only (a symlink that points out is refused), and the last
//! component is never followed when it is a symlink.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::fs::{
    self as wit, DirEntry, DirName, EntryKind, ErrorCode, FsError, Metadata,
};
use crate::runtime::Deadline;

/// Most entries one `list-dir` returns; a guest cannot make the host
/// allocate without bound by filling a directory.
pub const DEFAULT_MAX_LISTING: usize = 4_000_000;
/// Most paths one `remove-files` takes.
pub const MAX_BATCH: usize = 1_000_000;

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

    pub fn create_new(&self, path: &str) -> Result<OpenFile> {
        let p = check_name(path)?;
        let mut options = OpenOptions::new();
        options
            .write(true)
            .create_new(true)
            .follow(FollowSymlinks::No);
        let file = self
            .dir
            .open_with(p, &options)
            .map_err(|e| io_error(path, e))?;
        Ok(OpenFile {
            file: file.into_std(),
            path: path.to_string(),
            size_at_open: 0,
            writable: true,
        })
    }

    pub fn open(&self, path: &str) -> Result<OpenFile> {
        let p = check_name(path)?;
        let mut options = OpenOptions::new();
        options.read(true).follow(FollowSymlinks::No);
        let file = self
            .dir
            .open_with(p, &options)
            .map_err(|e| io_error(path, e))?
            .into_std();
        let meta = file.metadata().map_err(|e| io_error(path, e))?;
        if !meta.is_file() {
            return Err(error(
                ErrorCode::IsADirectory,
                format!("{path}: not a regular file"),
            ));
        }
        Ok(OpenFile {
            file,
            path: path.to_string(),
            size_at_open: meta.len(),
            writable: false,
        })
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
        let meta = self.dir.symlink_metadata(p).map_err(|e| io_error(path, e))?;
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
    pub fn list_names_until(
        &self,
        path: &str,
        deadline: Option<Deadline>,
    ) -> Result<Vec<DirName>> {
        self.walk(path, deadline, |entry, name| {
            let ft = entry.file_type()?;
            Ok(DirName {
                name,
                kind: kind(ft.is_symlink(), ft.is_file(), ft.is_dir()),
            })
        })
    }

    pub fn rename(&self, src: &str, dst: &str) -> Result<()> {
        let (s, d) = (check_name(src)?, check_name(dst)?);
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
                false if deadline.passed() => {
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
}

/// What the `fs` host functions borrow from a store.
pub struct FsView<'a> {
    pub root: &'a RootFs,
    pub table: &'a mut ResourceTable,
    /// The deadline of the driver call this import is part of.
    pub deadline: Deadline,
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
    wit::add_to_linker::<T, HasFs>(linker, view)
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
