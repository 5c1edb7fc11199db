//! What the database backends share: the runtime their async clients run
//! on (each call bounded by the driver call's deadline), the strings no
//! message may show, the once-per-backend role check, and how transactions
//! and times are read.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error;
use crate::bindings::database::{DatabaseError, ErrorCode, Value};
use crate::limits::Deadline;

/// The host's tokio runtime for database connections: one worker thread.
pub(super) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("image-cache-db")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the database runtime: {e}"))
    })
}

/// Run `work` on the database runtime; it is dropped (and so stopped) at
/// `deadline`. Works from any thread, inside another runtime or not.
pub(super) fn run<T: Send + 'static>(
    deadline: Deadline,
    work: impl Future<Output = T> + Send + 'static,
) -> std::result::Result<T, DatabaseError> {
    let remaining = deadline.remaining();
    if remaining.is_zero() {
        return Err(timed_out());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(tokio::time::timeout(remaining, work).await);
    });
    // The task ends itself at the deadline; a little slack for it to say so.
    match rx.recv_timeout(remaining + Duration::from_millis(250)) {
        Ok(Ok(value)) => Ok(value),
        _ => Err(timed_out()),
    }
}

pub(super) fn timed_out() -> DatabaseError {
    error(
        ErrorCode::TimedOut,
        "the database did not answer before the call's deadline",
    )
}

/// Strings never shown to a driver or a user: a URL, its password, hosts.
pub(super) struct Secrets(Vec<String>);

impl Secrets {
    pub(super) fn new(mut secrets: Vec<String>) -> Secrets {
        secrets.retain(|s| !s.is_empty());
        // Longest first, so a URL goes before its parts.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Secrets(secrets)
    }

    /// `message` without any secret. A secret is hidden where it stands
    /// alone, not inside a longer word or name: a host called `db` is
    /// hidden in `db:5432` and `@db`, not in `dbname` or `mydb`.
    pub(super) fn scrub(&self, message: &str) -> String {
        let mut m = message.to_string();
        for secret in &self.0 {
            m = replace_standalone(&m, secret, "(hidden)");
        }
        m
    }
}

/// `text` with each occurrence of `word` that is not part of a longer
/// word (letters, digits, `_`) replaced by `with`.
fn replace_standalone(text: &str, word: &str, with: &str) -> String {
    let wordy = |c: char| c.is_alphanumeric() || c == '_';
    let starts_wordy = word.chars().next().is_some_and(wordy);
    let ends_wordy = word.chars().last().is_some_and(wordy);
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(found) = text[from..].find(word) {
        let at = from + found;
        let end = at + word.len();
        let before = text[..at].chars().last();
        let after = text[end..].chars().next();
        let inside =
            (starts_wordy && before.is_some_and(wordy)) || (ends_wordy && after.is_some_and(wordy));
        out.push_str(&text[from..at]);
        out.push_str(if inside { word } else { with });
        from = end;
    }
    out.push_str(&text[from..]);
    out
}

/// Whether a backend's role was checked: not yet, passed, or refused (and
/// why, for every later connection).
#[derive(Default)]
pub(super) struct RoleCheck {
    state: AtomicU8,
    refusal: Mutex<String>,
}

// 0 (the default): not checked yet.
const ROLE_OK: u8 = 1;
const ROLE_REFUSED: u8 = 2;

impl RoleCheck {
    /// `Some(Ok)` passed, `Some(Err(why))` refused, `None` not checked yet.
    pub(super) fn outcome(&self) -> Option<std::result::Result<(), String>> {
        match self.state.load(Ordering::Acquire) {
            ROLE_OK => Some(Ok(())),
            ROLE_REFUSED => Some(Err(self
                .refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone())),
            _ => None,
        }
    }

    pub(super) fn pass(&self) {
        self.state.store(ROLE_OK, Ordering::Release);
    }

    pub(super) fn refuse(&self, why: String) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.state.store(ROLE_REFUSED, Ordering::Release);
    }
}

/// The role has `problems`: refused (with `remedy`), or allowed with a
/// warning when the operator said so. `Err` is the refusal.
pub(super) fn judge_role(
    check: &RoleCheck,
    name: &str,
    problems: &[String],
    allow_privileged_role: bool,
    remedy: impl FnOnce() -> String,
) -> std::result::Result<(), String> {
    if problems.is_empty() {
        check.pass();
        return Ok(());
    }
    if allow_privileged_role {
        log::warn!(
            "database {name:?}: its role {}; allowed by configuration \
             (image_cache_database_allow_privileged_role)",
            problems.join("; ")
        );
        check.pass();
        return Ok(());
    }
    let shown = problems.len().min(3);
    let why = format!(
        "refused: the configured role {}{} ({})",
        problems[..shown].join("; "),
        if problems.len() > shown { "; ..." } else { "" },
        remedy()
    );
    check.refuse(why.clone());
    Err(why)
}

/// Whether `sql` is a plain end of a transaction (`COMMIT`, `END`,
/// `ABORT` or `ROLLBACK`, with an optional `WORK`/`TRANSACTION`), not one
/// that opens another (`AND CHAIN`) or ends only a savepoint (`TO`).
pub(super) fn ends_transaction(sql: &str) -> bool {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        words.as_slice(),
        ["commit" | "end" | "abort" | "rollback"]
            | [
                "commit" | "end" | "abort" | "rollback",
                "work" | "transaction"
            ]
    )
}

/// What a value counts against a result's byte cap.
pub(super) fn value_size(v: &Value) -> usize {
    8 + match v {
        Value::Text(t) => t.len(),
        Value::Blob(b) => b.len(),
        _ => 0,
    }
}

/// Unix seconds as a `SystemTime`, within years 1 to 9999.
pub(super) fn unix_time(seconds: f64) -> Option<SystemTime> {
    if !seconds.is_finite() || !(-62_135_596_800.0..=253_402_300_799.0).contains(&seconds) {
        return None;
    }
    let span = Duration::from_secs_f64(seconds.abs());
    if seconds >= 0.0 {
        UNIX_EPOCH.checked_add(span)
    } else {
        UNIX_EPOCH.checked_sub(span)
    }
}

/// A `SystemTime` as Unix seconds (PostgreSQL's timestamps; MySQL's come
/// as calendar fields).
#[cfg(feature = "postgres")]
pub(super) fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_where_they_stand_alone() {
        let secrets = Secrets::new(vec!["db".into(), "hunter2".into()]);
        assert_eq!(
            secrets.scrub("could not connect to db:5432 (password hunter2); see `image-cache db grants`, not mydb"),
            "could not connect to (hidden):5432 (password (hidden)); see `image-cache (hidden) grants`, not mydb"
        );
        assert_eq!(
            secrets.scrub("user:hunter2@db/x"),
            "user:(hidden)@(hidden)/x"
        );
        assert_eq!(secrets.scrub("dbname=x hunter22"), "dbname=x hunter22");
    }

    #[test]
    fn only_a_plain_end_clears_the_transaction() {
        for sql in [
            "COMMIT",
            "commit;",
            " ROLLBACK  WORK ",
            "end transaction",
            "Abort",
        ] {
            assert!(ends_transaction(sql), "{sql}");
        }
        for sql in [
            "COMMIT AND CHAIN",
            "ROLLBACK AND CHAIN",
            "ROLLBACK\tTO sp",
            "ROLLBACK TO SAVEPOINT sp",
            "ROLLBACK\nTO sp",
            "COMMIT; BEGIN",
        ] {
            assert!(!ends_transaction(sql), "{sql}");
        }
    }
}
