"""A throwaway PostgreSQL for the centralized driver's tests (as the Rust
suite's ``tests/support/pg.rs``).

One cluster per test session: ``initdb`` + ``pg_ctl`` from
``/usr/lib/postgresql/15/bin`` in a temporary directory (run as the
``postgres`` user through ``runuser -u postgres --`` when the tests run as
root), a Unix socket there and a free loopback port, stopped when the
session ends (and, if the process was killed, by the next session).
``IMAGE_CACHE_TEST_POSTGRES=postgresql://admin@host:port/postgres`` uses a
running server instead (the admin may create roles and databases).
Without either the tests fail and say how to install the server.

Drivers connect over TCP as the role ``glance`` with a password (so the
tests see that no error ever shows it), each test in a database of its
own. Our own cluster takes TCP connections over TLS only (``hostssl``),
with a server certificate for ``localhost`` signed by a CA made here
(``Cluster.tls_ca``); the Unix socket the tests administer it by is plain.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import List, Optional

import psycopg

from image_cache_wasm import CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings
from image_cache_wasm.postgres import GLANCE_CACHE_SCHEMA, grant_statements

#: The server binaries' directory on Debian (postgresql-15).
PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: A running server to use instead of starting one.
PG_ENV = "IMAGE_CACHE_TEST_POSTGRES"
#: The drivers' role and its password: the tests look for it in messages.
ROLE = "glance"
PASSWORD = "Pw-9f3c2e-s3cr3t"
PREFIX = "image-cache-pg-py-"

_names = itertools.count()


class Unavailable(Exception):
    """No PostgreSQL to test with; the message says how to get one."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _pg_command(program: Path, as_postgres: bool) -> List[str]:
    """A command run as the ``postgres`` user when we are root (the server
    refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", str(program)] if as_postgres else [str(program)]


def _run(cmd: List[str], what: str) -> None:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {out.stdout}{out.stderr}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chown(path: Path) -> None:
    _run(["chown", "-R", "postgres:postgres", str(path)], f"chown of {path}")


def _stop_abandoned(as_postgres: bool) -> None:
    """Clusters of test sessions that were killed: stopped and removed."""
    for entry in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner = (entry / "owner.pid").read_text().strip()
        except OSError:
            continue
        if Path("/proc", owner).exists():
            continue
        subprocess.run(
            _pg_command(PG_BIN / "pg_ctl", as_postgres) + ["stop", "-m", "immediate", "-D", str(entry / "data")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(entry, ignore_errors=True)


def _make_tls(data: Path, dir: Path) -> Optional[Path]:
    """A CA and a server certificate for ``localhost`` (not for 127.0.0.1:
    the name check has something to fail on), TLS on, TCP without TLS
    refused. The CA's PEM file, or None without ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    ca_key, ca = dir / "ca.key", dir / "ca.crt"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run([openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "3650",
          "-subj", "/CN=image-cache test CA", "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"], "making the test CA")
    csr = dir / "server.csr"
    _run([openssl, "req", *ec, "-keyout", str(data / "server.key"), "-out", str(csr),
          "-subj", "/CN=localhost"], "making the server key")
    ext = dir / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
          "-CAcreateserial", "-out", str(data / "server.crt"), "-days", "3650", "-extfile", str(ext)],
         "signing the server certificate")
    os.chmod(data / "server.key", 0o600)
    os.chmod(ca, 0o644)
    conf = data / "postgresql.conf"
    conf.write_text(conf.read_text() + "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    hba = data / "pg_hba.conf"
    lines = []
    for line in hba.read_text().splitlines():
        lines.append("hostssl " + line[len("host "):] if line.startswith("host ") else line)
    lines.append("hostnossl all all all reject")
    hba.write_text("\n".join(lines) + "\n")
    return ca


class Cluster:
    """A PostgreSQL server the tests administer."""

    def __init__(self, admin: str, host: str, port: int, local: Optional[dict] = None):
        #: libpq connection string of an administrator (its database is
        #: replaced per call).
        self.admin = admin
        #: Host and port drivers connect to (TCP).
        self.host = host
        self.port = port
        self.local = local

    # -- starting ---------------------------------------------------------------

    @classmethod
    def external(cls, url: str) -> "Cluster":
        parts = urllib.parse.urlsplit(url)
        c = cls(url, parts.hostname or "localhost", parts.port or 5432)
        c.create_role()
        return c

    @classmethod
    def start_local(cls) -> "Cluster":
        if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
            raise Unavailable(
                f"PostgreSQL server binaries are missing ({PG_BIN}/initdb): the centralized driver's "
                "tests need a real server. Install it with `apt-get install -y postgresql-15`, or "
                f"point {PG_ENV} at a running server (postgresql://admin@host:port/postgres)"
            )
        as_postgres = _is_root()
        _stop_abandoned(as_postgres)
        dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (dir / "owner.pid").write_text(str(os.getpid()))
        data = dir / "data"
        if as_postgres:
            _chown(dir)
        _run(_pg_command(PG_BIN / "initdb", as_postgres)
             + ["-U", "postgres", "-E", "UTF8", "--no-sync", "-A", "trust",
                "--auth-host=scram-sha-256", "-D", str(data)], "initdb")
        ca = _make_tls(data, dir)
        if as_postgres:
            _chown(dir)
        port = _free_port()
        c = cls(
            f"host={dir} port={port} user=postgres dbname=postgres",
            "127.0.0.1",
            port,
            {"dir": dir, "data": data, "as_postgres": as_postgres, "ca": ca},
        )
        atexit.register(c.remove)
        c.start()
        c.create_role()
        return c

    def start(self) -> None:
        """Start our cluster (again), waiting until it takes connections."""
        local = self.local
        _run(_pg_command(PG_BIN / "pg_ctl", local["as_postgres"])
             + ["start", "-w", "-t", "60", "-D", str(local["data"]), "-l", str(local["dir"] / "server.log"),
                "-o", f"-p {self.port} -k {local['dir']} -c listen_addresses=127.0.0.1 -c fsync=off "
                      "-c max_connections=300"], "pg_ctl start")

    def stop(self) -> None:
        """Stop our cluster at once (connections are cut, as in a crash)."""
        local = self.local
        _run(_pg_command(PG_BIN / "pg_ctl", local["as_postgres"])
             + ["stop", "-w", "-m", "immediate", "-D", str(local["data"])], "pg_ctl stop")

    def remove(self) -> None:
        """Stop our cluster and remove its directory (end of the session)."""
        if self.local is None or not self.local["dir"].exists():
            return
        subprocess.run(
            _pg_command(PG_BIN / "pg_ctl", self.local["as_postgres"])
            + ["stop", "-m", "immediate", "-D", str(self.local["data"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(self.local["dir"], ignore_errors=True)

    @property
    def tls_ca(self) -> Optional[Path]:
        """The CA of our cluster's certificate (None: an external server, or
        no openssl to make one)."""
        return self.local["ca"] if self.local else None

    def postmaster_pid(self) -> int:
        return int((self.local["data"] / "postmaster.pid").read_text().split()[0])

    # -- administering ----------------------------------------------------------------

    def admin_conninfo(self, database: str) -> str:
        if self.local is not None:
            return f"host={self.local['dir']} port={self.port} user=postgres dbname={database}"
        parts = urllib.parse.urlsplit(self.admin)
        return urllib.parse.urlunsplit(parts._replace(path="/" + database))

    def admin_sql(self, database: str, sql: str, timeout: Optional[float] = None) -> str:
        """Run SQL (one or more statements) as the administrator in
        ``database``; the last statement's rows as ``psql -t -A`` prints
        them."""
        with psycopg.connect(self.admin_conninfo(database), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql)
            while cur.nextset():
                pass
            if cur.description is None:
                return ""
            return "\n".join("|".join("" if v is None else str(v) for v in row) for row in cur.fetchall())

    def create_role(self) -> None:
        self.admin_sql(
            "postgres",
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
            f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$",
        )
        if self.local is not None:
            # The superuser over TCP too, for the test that it is refused.
            self.admin_sql("postgres", f"ALTER ROLE postgres PASSWORD '{PASSWORD}'")

    def _new_database(self, owner: str = "") -> "TestDatabase":
        name = f"icpy_{os.getpid()}_{next(_names)}"
        self.admin_sql("postgres", f"CREATE DATABASE {name}{owner}")
        return TestDatabase(self, name)

    def database(self) -> "TestDatabase":
        """A new database as an operator sets it up for the cache: owned by
        the administrator, Glance's two cache tables in it (made as its
        migrations make them), and the drivers' role fenced by exactly the
        privileges ``image-cache db grants`` prints."""
        db = self._new_database()
        db.sql(GLANCE_CACHE_SCHEMA)
        db.grant_cache_privileges(ROLE)
        return db

    def owned_database(self) -> "TestDatabase":
        """A new, empty database owned by the drivers' role (for the
        statement checks, which need a role that may create tables; its
        connections must allow a privileged role)."""
        return self._new_database(f" OWNER {ROLE}")

    def bare_database(self) -> "TestDatabase":
        """A new, empty database without Glance's tables, the drivers' role
        allowed to connect only."""
        db = self._new_database()
        db.sql(f"GRANT CONNECT ON DATABASE {db.name} TO {ROLE}")
        return db


class TestDatabase:
    """A database of one test."""

    __test__ = False  # not a pytest class

    def __init__(self, cluster: Cluster, name: str):
        self.cluster = cluster
        self.name = name
        #: As the drivers' role, with its password, over TCP.
        self.url = f"postgresql://{ROLE}:{PASSWORD}@{cluster.host}:{cluster.port}/{name}"
        #: As the cluster's superuser (our own cluster only).
        self.superuser_url = (
            f"postgresql://postgres:{PASSWORD}@{cluster.host}:{cluster.port}/{name}" if cluster.local else None
        )
        self._roots: List[DatabaseRoot] = []

    def sql(self, sql: str) -> str:
        """Run SQL as the administrator in this database."""
        return self.cluster.admin_sql(self.name, sql)

    def grant_cache_privileges(self, role: str) -> None:
        """Run what ``image-cache db grants`` prints for ``role``."""
        self.sql("\n".join(grant_statements(role, self.name)))

    def root_with(self, settings: DatabaseSettings) -> DatabaseRoot:
        root = DatabaseRoot().with_database(CENTRALIZED_DATABASE, settings)
        self._roots.append(root)
        return root

    def root(self, **settings) -> DatabaseRoot:
        """The databases a cache may open: this one as ``glance``."""
        return self.root_with(DatabaseSettings(self.url, **settings))

    def privileged_root(self, **settings) -> DatabaseRoot:
        """This database with a role that has more than a cache driver
        needs allowed (the statement-check tests)."""
        return self.root(allow_privileged_role=True, **settings)

    def close(self) -> None:
        for root in self._roots:
            root.close()


_shared: Optional[Cluster] = None
_local: Optional[Cluster] = None


def shared() -> Cluster:
    """The cluster of this test session (raises :class:`Unavailable`)."""
    global _shared
    if _shared is None:
        url = os.environ.get(PG_ENV, "").strip()
        _shared = Cluster.external(url) if url else Cluster.start_local()
    return _shared


def local() -> Cluster:
    """A cluster this session started and may stop: the shared one, or, when
    the shared one is external, one of its own."""
    global _local
    c = shared()
    if c.local is not None:
        return c
    if _local is None:
        _local = Cluster.start_local()
    return _local
