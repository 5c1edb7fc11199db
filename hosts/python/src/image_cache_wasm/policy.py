"""What a driver's SQL may say to a shared database, checked on the host
before the statement is sent. A port of the Rust host's
``host/src/database/policy.rs``: the same tokenizer, the same lists, the
same messages.

The real fence is the database role the operator gives the host (no
superuser, no ``pg_read_server_files``, ``pg_write_server_files`` or
``pg_execute_server_program``; the backend checks that when it connects,
``postgres.py``). This is defence in depth on top of it, and it closes what
any role can do that a cache driver never needs:

- **One statement** per call.
- **Statements a driver needs**, by their first word: ``SELECT``,
  ``INSERT``, ``UPDATE``, ``DELETE``, ``WITH``, ``VALUES``, transactions and
  savepoints, ``CREATE TABLE`` / ``CREATE [UNIQUE] INDEX`` and ``LOCK``. Not
  ``COPY``, ``SET``/``RESET``, ``SHOW``, ``ALTER SYSTEM``, ``LOAD``, ``DO``,
  ``CALL``, ``CREATE FUNCTION``/``EXTENSION``/``ROLE``, ``GRANT``,
  ``LISTEN``/``NOTIFY``, ``PREPARE``, cursors, ``VACUUM``, ...
- **No names** that reach beyond the driver's tables or tell it where it
  runs, anywhere in the statement (outside string literals and comments):
  the catalogs (``pg_*``, ``information_schema``), large objects (``lo_*``),
  ``dblink*``, settings (``set_config``, ``current_setting``), addresses
  (``inet_*``), who the session is (``current_user``, ``user``, ...), and
  functions that run SQL given as a string (``query_to_xml`` and the other
  ``*_to_xml``, ``ts_stat``, ``ts_rewrite``).

On MySQL and MariaDB (``dialect="mysql"``, ``mysql.py``) the same rules hold, read the
way their scanner reads SQL (backquoted names are words, no dollar quotes,
no ``E'...'`` escapes), and more is refused: comments of every kind,
variables (``@x``, ``@@datadir``), server files (``LOAD_FILE``, ``INTO
OUTFILE``/``DUMPFILE``), the system schemas, who and where the session is,
and server-wide named locks.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

#: Longest SQL text a driver may send (bytes).
MAX_SQL_BYTES = 64 * 1024

#: First words a statement may start with.
STATEMENTS = (
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
)

#: What may follow ``CREATE``.
CREATABLE = ("table", "index", "unique")

#: Names refused anywhere in a statement.
DENIED = (
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
)

#: More names refused anywhere on MySQL and MariaDB.
DENIED_MYSQL = (
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
)

#: Prefixes of names refused anywhere.
DENIED_PREFIXES = ("pg_", "lo_", "dblink")

#: Suffixes of names refused anywhere (``query_to_xml``, ``table_to_xmlschema``).
DENIED_SUFFIXES = ("_to_xml", "_to_xmlschema", "_to_xml_and_xmlschema")

# Tokens: ("word", text) | (";", None) | ("other", None)
_SEMI = (";", None)
_OTHER = ("other", None)

Token = Tuple[str, Optional[str]]


class PolicyError(ValueError):
    """Why a statement is refused; the message says what to change."""


def _alnum(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


def _alpha(b: int) -> bool:
    return 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


def _space(b: int) -> bool:
    # Rust's u8::is_ascii_whitespace: space, \t, \n, \x0C (form feed), \r.
    return b in (0x20, 0x09, 0x0A, 0x0C, 0x0D)


def _lower(raw: bytes) -> str:
    # Rust's to_ascii_lowercase on UTF-8 (lossy for a quoted identifier).
    return raw.decode("utf-8", "replace").translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(0x41, 0x5B)}


def tokenize(sql: str, dialect: str = "postgresql", marks: Optional[List[int]] = None) -> List[Token]:
    """Split SQL into words, ``;`` and the rest, skipping whitespace,
    comments and string literals ('...', E'...', $tag$...$tag$). Quoted
    identifiers are words (lowercased, so ``"PG_READ_FILE"`` is caught
    too). On MySQL, backquoted names are words too, and comments and
    variables are refused. ``marks``, if given, receives the byte offset
    (in the UTF-8 text) of every ``?`` outside literals, names and
    comments: MySQL's placeholders as its server reads them."""
    b = sql.encode("utf-8", "surrogatepass")
    n = len(b)
    tokens: List[Token] = []
    i = 0
    mysql = dialect == "mysql"

    def unterminated(what: str) -> PolicyError:
        return PolicyError(f"unterminated {what} in SQL")

    def quoted_word(quote: int) -> None:
        nonlocal i
        word = bytearray()
        i += 1
        while True:
            if i >= n:
                raise unterminated("quoted identifier")
            x = b[i]
            if x == quote and i + 1 < n and b[i + 1] == quote:
                word.append(quote)
                i += 2
            elif x == quote:
                i += 1
                break
            else:
                word.append(x)
                i += 1
        tokens.append(("word", _lower(bytes(word))))

    while i < n:
        c = b[i]
        if _space(c):
            i += 1
        elif mysql and (
            c == 0x23
            or (c == 0x2D and i + 1 < n and b[i + 1] == 0x2D)
            or (c == 0x2F and i + 1 < n and b[i + 1] == 0x2A)
        ):
            raise PolicyError(
                "comments are not allowed in MySQL statements (the server runs /*! ... */ and "
                "reads 1--1 as arithmetic)"
            )
        elif mysql and c == 0x40:  # @
            raise PolicyError("variables (@name, @@name) are not allowed")
        elif mysql and c == 0x60:  # `
            quoted_word(0x60)
        elif c == 0x2D and i + 1 < n and b[i + 1] == 0x2D:  # --
            # PostgreSQL's scanner ends a comment at a newline or a
            # carriage return (release 0.2 missed the \r).
            while i < n and b[i] != 0x0A and b[i] != 0x0D:
                i += 1
        elif c == 0x2F and i + 1 < n and b[i + 1] == 0x2A:  # /*
            # Comments nest in PostgreSQL.
            depth = 0
            while True:
                if i + 1 >= n:
                    raise unterminated("comment")
                if b[i] == 0x2F and b[i + 1] == 0x2A:
                    depth += 1
                    i += 2
                elif b[i] == 0x2A and b[i + 1] == 0x2F:
                    depth -= 1
                    i += 2
                    if depth == 0:
                        break
                else:
                    i += 1
        elif c == 0x27:  # '
            # E'...' strings take backslash escapes; the E was read as a
            # word just before, which is harmless.
            escapes = (
                not mysql
                and i > 0
                and b[i - 1] in (0x65, 0x45)
                and (i < 2 or not (_alnum(b[i - 2]) or b[i - 2] == 0x5F or b[i - 2] >= 0x80))
            )
            i += 1
            while True:
                if i >= n:
                    raise unterminated("string")
                x = b[i]
                if x == 0x5C and escapes:
                    i += 2
                elif x == 0x27 and i + 1 < n and b[i + 1] == 0x27:
                    i += 2
                elif x == 0x27:
                    i += 1
                    break
                else:
                    i += 1
            tokens.append(_OTHER)
        elif c == 0x22:  # "
            quoted_word(0x22)
        elif not mysql and c == 0x24 and i + 1 < n and (b[i + 1] == 0x24 or _alpha(b[i + 1]) or b[i + 1] == 0x5F):
            # A dollar-quoted string: $tag$ ... $tag$.
            end = b.find(b"$", i + 1)
            if end < 0:
                raise unterminated("dollar quote")
            tag = b[i:end + 1]
            if not all(_alnum(x) or x == 0x5F for x in tag[1:-1]):
                raise PolicyError("malformed dollar quote in SQL")
            body = i + len(tag)
            close = b.find(tag, body)
            if close < 0:
                raise unterminated("dollar-quoted string")
            i = close + len(tag)
            tokens.append(_OTHER)
        elif c == 0x26 and i > 0 and b[i - 1] in (0x75, 0x55) and i + 1 < n and b[i + 1] in (0x22, 0x27):
            # U&"..." spells a name with escapes (U&"pg\005fread_file").
            raise PolicyError("Unicode-escaped names and strings (U&) are not allowed")
        elif c == 0x3B:  # ;
            tokens.append(_SEMI)
            i += 1
        elif _alpha(c) or c == 0x5F or c >= 0x80:
            start = i
            while i < n and (_alnum(b[i]) or b[i] == 0x5F or b[i] == 0x24 or b[i] >= 0x80):
                i += 1
            tokens.append(("word", _lower(b[start:i])))
        else:
            if marks is not None and c == 0x3F:  # ?
                marks.append(i)
            tokens.append(_OTHER)
            i += 1
    return tokens


def placeholders(sql: str) -> List[int]:
    """The byte offsets (in ``sql`` as UTF-8) of its ``?`` placeholders as
    MySQL reads them under ``NO_BACKSLASH_ESCAPES`` and ``ANSI_QUOTES``:
    outside '...' strings, "..." and `...` names. Raises
    :class:`PolicyError` where :func:`check` would."""
    marks: List[int] = []
    tokenize(sql, "mysql", marks)
    return marks


def check(sql: str, dialect: str = "postgresql") -> None:
    """Raise :class:`PolicyError` if a driver may not send ``sql`` to a
    server speaking ``dialect`` (``postgresql`` or ``mysql``)."""
    if len(sql.encode("utf-8", "surrogatepass")) > MAX_SQL_BYTES:
        raise PolicyError(f"SQL text is longer than {MAX_SQL_BYTES} bytes")
    tokens = tokenize(sql, dialect)
    words = [t[1] for t in tokens if t[0] == "word"]
    if not words:
        raise PolicyError("empty statement")
    first = words[0]
    if first not in STATEMENTS:
        raise PolicyError(f"a driver may not run {first.upper()} statements")
    if first == "create":
        what = words[1] if len(words) > 1 else ""
        if what not in CREATABLE:
            raise PolicyError(f"a driver may create tables and indexes, not {what.upper()}")
    # One statement: nothing but a trailing `;` after the first one.
    if _SEMI in tokens:
        at = tokens.index(_SEMI)
        if any(t != _SEMI for t in tokens[at + 1:]):
            raise PolicyError("one statement per call")
    for w in words:
        if (
            w in DENIED
            or (dialect == "mysql" and w in DENIED_MYSQL)
            or w.startswith(DENIED_PREFIXES)
            or w.endswith(DENIED_SUFFIXES)
        ):
            raise PolicyError(f"a driver's SQL may not use {_debug(w)}")


def _debug(s: str) -> str:
    """A string as Rust's ``{:?}`` shows it (for the same messages)."""
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def first_word(sql: str) -> Optional[str]:
    """The first word of a statement, lowercased (``begin``, ``commit``, ...)."""
    try:
        tokens = tokenize(sql)
    except PolicyError:
        return None
    for kind, text in tokens:
        if kind == "word":
            return text
    return None
