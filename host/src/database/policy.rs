//! What a driver's SQL may say to a shared database, checked on the host
//! before the statement is sent.
//!
//! The real fence is the database role the operator gives the host (no
//! superuser, no `pg_read_server_files`, `pg_write_server_files` or
//! `pg_execute_server_program`; the backend checks that when it connects).
//! This is defence in depth on top of it, and it closes what any role can
//! do that a cache driver never needs:
//!
//! - **One statement** per call (the extended protocol refuses several as
//!   well; this says so before a round trip).
//! - **Statements a driver needs**, by their first word: `SELECT`, `INSERT`,
//!   `UPDATE`, `DELETE`, `WITH`, `VALUES`, transactions and savepoints,
//!   `CREATE TABLE` / `CREATE [UNIQUE] INDEX` and `LOCK`. Not `COPY` (files
//!   and programs on the server), `SET`/`RESET` (`SET ROLE`, `SET SESSION
//!   AUTHORIZATION`, the host's timeouts), `SHOW` (server settings), `ALTER
//!   SYSTEM`, `LOAD`, `DO`, `CALL`, `CREATE FUNCTION`/`EXTENSION`/`ROLE`,
//!   `GRANT`, `LISTEN`/`NOTIFY`, `PREPARE`, cursors, `VACUUM`, ...
//! - **No names** that reach beyond the driver's tables or tell it where it
//!   runs, anywhere in the statement (outside string literals and
//!   comments): the catalogs (`pg_*`, `information_schema`), large objects
//!   (`lo_*`: `lo_import`/`lo_export` read and write server files),
//!   `dblink*`, settings (`set_config`, `current_setting`), the server's and
//!   client's addresses (`inet_*`), who the session is (`current_user`,
//!   `session_user`, `user`, `current_database`, ...), and functions that
//!   run SQL given as a string (`query_to_xml` and the other `*_to_xml`,
//!   `ts_stat`, `ts_rewrite`), which would carry any of the above past
//!   this check.
//!
//! On MySQL and MariaDB ([`Dialect::Mysql`]) the same rules hold, read the
//! way their scanner reads SQL (backquoted names are words, no dollar
//! quotes; the host sets `NO_BACKSLASH_ESCAPES` and `ANSI_QUOTES` on every
//! session so strings and `"names"` scan as here), and more is refused:
//! **comments** of every kind (`/*! ... */` and `/*M! ... */` are run, not
//! skipped, and `1--1` is arithmetic), **variables** (`@x`, `@@datadir`),
//! server files (`LOAD_FILE`, `INTO OUTFILE`/`DUMPFILE`), the system
//! schemas (`mysql`, `performance_schema`, `sys`), who and where the
//! session is (`DATABASE()`, `CONNECTION_ID()`, `UUID()`, which carries the
//! server's MAC address), and server-wide named locks (`GET_LOCK`, ...).

use crate::bindings::database::Dialect;

/// Longest SQL text a driver may send.
pub const MAX_SQL_BYTES: usize = 64 * 1024;

/// First words a statement may start with.
const STATEMENTS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "with",
    "values",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "create",
    "lock",
];

/// What may follow `CREATE`.
const CREATABLE: &[&str] = &["table", "index", "unique"];

/// Names refused anywhere in a statement.
const DENIED: &[&str] = &[
    "information_schema",
    "set_config",
    "current_setting",
    "inet_server_addr",
    "inet_server_port",
    "inet_client_addr",
    "inet_client_port",
    "current_user",
    "session_user",
    "system_user",
    "user",
    "current_role",
    "current_database",
    "current_catalog",
    "current_schema",
    "current_schemas",
    "version",
    "ts_stat",
    "ts_rewrite",
    "txid_current_snapshot",
];

/// More names refused anywhere on MySQL and MariaDB.
const DENIED_MYSQL: &[&str] = &[
    "load_file",
    "outfile",
    "dumpfile",
    "mysql",
    "performance_schema",
    "sys",
    "database",
    "schema",
    "connection_id",
    "uuid",
    "uuid_short",
    "get_lock",
    "release_lock",
    "release_all_locks",
    "is_free_lock",
    "is_used_lock",
    "master_pos_wait",
    "master_gtid_wait",
    "source_pos_wait",
    "sys_exec",
    "sys_eval",
];

/// Prefixes of names refused anywhere.
const DENIED_PREFIXES: &[&str] = &["pg_", "lo_", "dblink"];

/// Suffixes of names refused anywhere (`query_to_xml`, `table_to_xmlschema`).
const DENIED_SUFFIXES: &[&str] = &["_to_xml", "_to_xmlschema", "_to_xml_and_xmlschema"];

/// A word of SQL outside literals and comments, lowercased, and whether it
/// was a quoted identifier.
#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Semicolon,
    Other,
}

/// Why a driver's statement is refused; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("SQL text is longer than {MAX_SQL_BYTES} bytes")]
    TooLong,
    #[error("empty statement")]
    Empty,
    /// A kind of statement outside the allow-list (its first word).
    #[error("a driver may not run {} statements", .0.to_ascii_uppercase())]
    Statement(String),
    /// `CREATE` of something other than a table or an index.
    #[error("a driver may create tables and indexes, not {}", .0.to_ascii_uppercase())]
    Create(String),
    #[error("one statement per call")]
    SeveralStatements,
    /// A name (function, table, keyword) a driver may not use.
    #[error("a driver's SQL may not use {0:?}")]
    Denied(String),
    #[error(
        "comments are not allowed in MySQL statements (the server runs /*! ... */ and reads 1--1 as arithmetic)"
    )]
    MysqlComment,
    #[error("variables (@name, @@name) are not allowed")]
    Variable,
    /// A comment, string, quote or quoted name that does not end.
    #[error("unterminated {0} in SQL")]
    Unterminated(&'static str),
    #[error("malformed dollar quote in SQL")]
    MalformedDollarQuote,
    #[error("Unicode-escaped names and strings (U&) are not allowed")]
    UnicodeEscape,
}

/// Whether a driver may send `sql`: `Err` says why not.
pub fn check(dialect: Dialect, sql: &str) -> Result<(), Refusal> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(Refusal::TooLong);
    }
    let tokens = tokenize(dialect, sql)?;
    let mut words = tokens.iter().filter_map(|t| match t {
        Token::Word(w) => Some(w.as_str()),
        _ => None,
    });
    let Some(first) = words.next() else {
        return Err(Refusal::Empty);
    };
    if !STATEMENTS.contains(&first) {
        return Err(Refusal::Statement(first.to_string()));
    }
    if first == "create" {
        let what = words.next().unwrap_or("");
        if !CREATABLE.contains(&what) {
            return Err(Refusal::Create(what.to_string()));
        }
    }
    // One statement: nothing but a trailing `;` after the first one.
    if let Some(i) = tokens.iter().position(|t| *t == Token::Semicolon)
        && tokens[i + 1..].iter().any(|t| *t != Token::Semicolon)
    {
        return Err(Refusal::SeveralStatements);
    }
    for t in &tokens {
        if let Token::Word(w) = t {
            let denied = DENIED.contains(&w.as_str())
                || (dialect == Dialect::Mysql && DENIED_MYSQL.contains(&w.as_str()))
                || DENIED_PREFIXES.iter().any(|p| w.starts_with(p))
                || DENIED_SUFFIXES.iter().any(|s| w.ends_with(s));
            if denied {
                return Err(Refusal::Denied(w.clone()));
            }
        }
    }
    Ok(())
}

/// Split SQL into words, `;` and the rest, skipping whitespace, comments
/// and string literals ('...', E'...', $tag$...$tag$). Quoted identifiers
/// are words (lowercased, so `"PG_READ_FILE"` is caught too). On MySQL,
/// backquoted names are words too, and comments and variables are refused.
fn tokenize(dialect: Dialect, sql: &str) -> Result<Vec<Token>, Refusal> {
    let b = sql.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mysql = dialect == Dialect::Mysql;
    while i < b.len() {
        let c = b[i];
        match c {
            _ if c.is_ascii_whitespace() => i += 1,
            b'-' | b'/' | b'#'
                if mysql
                    && (c == b'#'
                        || (c == b'-' && b.get(i + 1) == Some(&b'-'))
                        || (c == b'/' && b.get(i + 1) == Some(&b'*'))) =>
            {
                return Err(Refusal::MysqlComment);
            }
            b'@' if mysql => {
                return Err(Refusal::Variable);
            }
            b'`' if mysql => {
                let (word, end) = quoted_name(b, i)?;
                tokens.push(Token::Word(word));
                i = end;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                // PostgreSQL's scanner ends a comment at a newline or a
                // carriage return (release 0.2 missed the `\r`).
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Comments nest in PostgreSQL.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= b.len() {
                        return Err(Refusal::Unterminated("comment"));
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                // E'...' strings take backslash escapes; the E was read as
                // a word just before, which is harmless.
                let escapes = !mysql
                    && i > 0
                    && matches!(b[i - 1], b'e' | b'E')
                    && (i < 2
                        || !(b[i - 2].is_ascii_alphanumeric()
                            || b[i - 2] == b'_'
                            || b[i - 2] >= 0x80));
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(Refusal::Unterminated("string")),
                        Some(b'\\') if escapes => i += 2,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                tokens.push(Token::Other);
            }
            b'"' => {
                let (word, end) = quoted_name(b, i)?;
                tokens.push(Token::Word(word));
                i = end;
            }
            b'$' if !mysql
                && b.get(i + 1)
                    .is_some_and(|&n| n == b'$' || n.is_ascii_alphabetic() || n == b'_') =>
            {
                // A dollar-quoted string: $tag$ ... $tag$.
                let tag_end = b[i + 1..].iter().position(|&x| x == b'$');
                let Some(len) = tag_end else {
                    return Err(Refusal::Unterminated("dollar quote"));
                };
                let tag = &b[i..i + len + 2];
                if !tag[1..tag.len() - 1]
                    .iter()
                    .all(|x| x.is_ascii_alphanumeric() || *x == b'_')
                {
                    return Err(Refusal::MalformedDollarQuote);
                }
                let body = i + tag.len();
                let close = b[body..].windows(tag.len()).position(|w| w == tag);
                let Some(at) = close else {
                    return Err(Refusal::Unterminated("dollar-quoted string"));
                };
                i = body + at + tag.len();
                tokens.push(Token::Other);
            }
            b'&' if i > 0
                && matches!(b[i - 1], b'u' | b'U')
                && matches!(b.get(i + 1), Some(b'"') | Some(b'\'')) =>
            {
                // U&"..." spells a name with escapes (U&"pg\005fread_file").
                return Err(Refusal::UnicodeEscape);
            }
            b';' => {
                tokens.push(Token::Semicolon);
                i += 1;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                tokens.push(Token::Word(sql[start..i].to_ascii_lowercase()));
            }
            _ => {
                tokens.push(Token::Other);
                i += 1;
            }
        }
    }
    Ok(tokens)
}

/// The quoted name starting at `b[start]` (its quote character doubled
/// inside), lowercased, and where it ends.
fn quoted_name(b: &[u8], start: usize) -> Result<(String, usize), Refusal> {
    let q = b[start];
    let mut word = Vec::new();
    let mut i = start + 1;
    loop {
        match b.get(i) {
            None => return Err(Refusal::Unterminated("quoted identifier")),
            Some(&c) if c == q && b.get(i + 1) == Some(&q) => {
                word.push(q);
                i += 2;
            }
            Some(&c) if c == q => {
                return Ok((String::from_utf8_lossy(&word).to_ascii_lowercase(), i + 1));
            }
            Some(&c) => {
                word.push(c);
                i += 1;
            }
        }
    }
}

/// The first word of a statement, lowercased (`begin`, `commit`, ...).
pub fn first_word(sql: &str) -> Option<String> {
    tokenize(Dialect::Postgresql, sql)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Token::Word(w) => Some(w),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared cases every host's check plays
    /// (`tests/scenarios/sql_policy.json`).
    fn cases(dialect: &str, which: &str) -> Vec<String> {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/scenarios/sql_policy.json"
        ));
        let cases: serde_json::Value = serde_json::from_str(text).expect("sql_policy.json");
        cases[dialect][which]
            .as_array()
            .expect("a list of statements")
            .iter()
            .map(|s| s.as_str().expect("a statement").to_string())
            .collect()
    }

    #[test]
    fn allows_what_the_centralized_driver_runs() {
        for (name, dialect) in [
            ("postgresql", Dialect::Postgresql),
            ("mysql", Dialect::Mysql),
        ] {
            let allowed = cases(name, "allowed");
            assert!(allowed.len() > 5);
            for sql in allowed {
                assert_eq!(check(dialect, &sql), Ok(()), "{name}: {sql}");
            }
        }
    }

    #[test]
    fn refuses_what_reaches_beyond_the_tables() {
        for (name, dialect) in [
            ("postgresql", Dialect::Postgresql),
            ("mysql", Dialect::Mysql),
        ] {
            let refused = cases(name, "refused");
            assert!(refused.len() > 30);
            for sql in refused {
                assert!(check(dialect, &sql).is_err(), "{name}: {sql} was allowed");
            }
            assert_eq!(
                check(dialect, &"SELECT 1 ".repeat(20_000)),
                Err(Refusal::TooLong)
            );
        }
    }

    #[test]
    fn refusals_say_what_to_change() {
        let message = |sql: &str| check(Dialect::Postgresql, sql).unwrap_err().to_string();
        assert_eq!(
            message("drop table x"),
            "a driver may not run DROP statements"
        );
        assert_eq!(
            message("create view v as select 1"),
            "a driver may create tables and indexes, not VIEW"
        );
        assert_eq!(message("select 1; select 2"), "one statement per call");
        assert_eq!(
            message("select pg_read_file('x')"),
            "a driver's SQL may not use \"pg_read_file\""
        );
        assert_eq!(message("select 'x"), "unterminated string in SQL");
        assert_eq!(
            message("select \"x"),
            "unterminated quoted identifier in SQL"
        );
        assert_eq!(message("  "), "empty statement");
        assert_eq!(
            check(Dialect::Mysql, "select 1 # x")
                .unwrap_err()
                .to_string(),
            "comments are not allowed in MySQL statements (the server runs /*! ... */ and \
             reads 1--1 as arithmetic)"
        );
    }

    #[test]
    fn first_words() {
        assert_eq!(first_word("  -- x\n begin").as_deref(), Some("begin"));
        assert_eq!(first_word("COMMIT;").as_deref(), Some("commit"));
    }
}
