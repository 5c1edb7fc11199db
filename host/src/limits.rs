//! Deadlines, default bounds and printable text: the leaf the other modules
//! build on.
//!
//! What several modules share but none of them owns lives here: the
//! [`Deadline`] of the driver call running in a store (set by the runtime
//! and the driver, honoured by the `fs` and `database` imports), the
//! defaults one module sets and another reads, and [`printable`], which
//! makes a driver's or a component's words fit for a log or a terminal.
//! This module imports nothing from the crate, so a lower module (`fs`,
//! `database`, `error`, `contract`) never has to import from a higher one
//! (`runtime`, `driver`, `cache`) for them.

use std::time::{Duration, Instant};

/// The deadline of the call running in a store, which host imports honour.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Longest a call made without waiting ([`without_waiting`]) may run:
/// such calls run on an event loop's thread, which nothing else uses
/// meanwhile.
pub const NO_WAIT_DEADLINE: Duration = Duration::from_secs(1);

thread_local! {
    /// Whether driver calls on this thread must not wait (see
    /// [`without_waiting`]), and whether one wanted to.
    static NO_WAIT: std::cell::Cell<(bool, bool)> = const { std::cell::Cell::new((false, false)) };
}

/// Run `f`, whose driver calls run on this thread, such that none of them
/// waits: a host import that would wait (a pause for another holder's lock,
/// a file lock held elsewhere) answers at once as if the call's deadline
/// had passed. Whether one wanted to wait: then `f`'s result says nothing
/// about the cache, and the caller asks again where waiting is fine.
pub fn without_waiting<T>(f: impl FnOnce() -> T) -> (T, bool) {
    /// Puts the thread's state back however `f` ends (a panic included:
    /// the thread may go on to make calls that must be able to wait).
    struct Restore((bool, bool));
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_WAIT.set(self.0);
        }
    }
    let _restore = Restore(NO_WAIT.get());
    NO_WAIT.set((true, false));
    let value = f();
    let wanted = NO_WAIT.get().1;
    (value, wanted)
}

/// Whether calls on this thread run under [`without_waiting`].
pub fn waiting_forbidden() -> bool {
    NO_WAIT.get().0
}

/// A host import is about to wait: may it? Under [`without_waiting`] it
/// may not, and that it wanted to is noted.
pub fn may_wait() -> bool {
    let (forbidden, _) = NO_WAIT.get();
    if forbidden {
        NO_WAIT.set((true, true));
    }
    !forbidden
}

/// Most entries one `list-dir` returns by default (`Limits::max_listing`);
/// a guest cannot make the host allocate without bound by filling a
/// directory.
pub const DEFAULT_MAX_LISTING: usize = 4_000_000;

/// Default cap on the bytes of one query's result (`Limits::max_query_bytes`,
/// `DatabaseSettings::max_result_bytes`).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024 * 1024;

/// Glance's default `image_cache_sqlite_db`: the metadata database's name
/// in the root, the one top-level file a driver may write.
pub const DEFAULT_SQLITE_DB: &str = "cache.db";

/// Whether [`printable`] shows a character as `?`: control characters,
/// bidirectional marks, zero-width and other invisible formatting (the
/// rule of the `image-id` crate, shared with the drivers).
pub use image_id::hidden;

/// A guest-supplied string as one printable line of at most `max` chars:
/// control characters (terminal escapes included) become `?`.
pub fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if hidden(c) { '?' } else { c })
        .collect();
    if s.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_cuts_and_masks() {
        assert_eq!(printable("plain", 10), "plain");
        assert_eq!(printable("a\x1b[31mb", 10), "a?[31mb");
        assert_eq!(printable("abcdef", 3), "abc...");
        assert_eq!(printable("line\nnext", 20), "line?next");
    }

    #[test]
    fn waiting_is_forbidden_only_inside_and_restored_after_a_panic() {
        assert!(may_wait());
        let ((), wanted) = without_waiting(|| {
            assert!(waiting_forbidden());
            assert!(!may_wait());
        });
        assert!(wanted);
        let ((), wanted) = without_waiting(|| ());
        assert!(!wanted);
        let panicked = std::panic::catch_unwind(|| without_waiting(|| panic!("inside")));
        assert!(panicked.is_err());
        assert!(
            !waiting_forbidden() && may_wait(),
            "restored after the panic"
        );
    }

    #[test]
    fn deadlines_count_down() {
        let past = Deadline(Instant::now());
        assert!(past.passed());
        assert_eq!(past.remaining(), Duration::ZERO);
        let future = Deadline(Instant::now() + Duration::from_secs(60));
        assert!(!future.passed());
        assert!(future.remaining() > Duration::from_secs(50));
    }
}
