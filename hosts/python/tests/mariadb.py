"""A throwaway MariaDB for the centralized driver's tests on MySQL (as the
Rust suite's ``tests/support/mariadb.rs``).

One server per test session: ``mariadb-install-db`` + ``/usr/sbin/mariadbd``
in a temporary directory (as the ``mysql`` user when the tests run as
root), a Unix socket there and a free loopback port, stopped when the
session ends (and, if the process was killed, by the next session).
``IMAGE_CACHE_TEST_MARIADB=mysql://root:pw@host:port/`` uses a running
server instead (an administrator who may create accounts and databases;
its TLS is its own business). Without either the tests fail and say how to
install the server.

Drivers connect over TCP with a password (the tests look for it in every
message), each test in a database of its own with an account of its own,
named as the database: MySQL's accounts are server-wide, and one granted
the cache tables of two databases holds more than a driver of either needs
(the fence refuses it). Our own server takes TCP connections over TLS only
(``require_secure_transport``), with a certificate for ``localhost`` signed
by a CA made here (:attr:`Server.tls_ca`, with the ``openssl`` CLI, else the
``cryptography`` package); the tests administer it over the Unix socket.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import List, Optional

import pymysql
from pymysql.constants import CLIENT

from image_cache_wasm import CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings
from image_cache_wasm.mysql import GLANCE_CACHE_SCHEMA, grant_statements

#: Debian's server binaries (mariadb-server).
MARIADBD = Path("/usr/sbin/mariadbd")
INSTALL_DB = Path("/usr/bin/mariadb-install-db")
#: A running server to use instead of starting one.
MARIADB_ENV = "IMAGE_CACHE_TEST_MARIADB"
#: The drivers' accounts' password: the tests look for it.
PASSWORD = "Pw-7a1d4b-m4r1a"
PREFIX = "image-cache-mariadb-py-"

_names = itertools.count()


class Unavailable(Exception):
    """No MariaDB to test with; the message says how to get one."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: List[str], what: str) -> None:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {out.stdout}{out.stderr}")


def _kill_pid_file(dir: Path) -> None:
    try:
        pid = int((dir / "mariadb.pid").read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _stop_abandoned() -> None:
    """Servers of test sessions that were killed: stopped and removed."""
    for entry in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner = (entry / "owner.pid").read_text().strip()
        except OSError:
            continue
        if Path("/proc", owner).exists():
            continue
        _kill_pid_file(entry)
        shutil.rmtree(entry, ignore_errors=True)


def make_ca(dir: Path, name: str = "image-cache test CA (MariaDB)") -> Path:
    """A self-signed CA in ``dir`` (``ca.crt``, ``ca.key``); its file."""
    ca_key, ca = dir / "ca.key", dir / "ca.crt"
    openssl = shutil.which("openssl")
    if openssl is not None:
        _run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(ca_key), "-out", str(ca), "-days", "3650", "-subj", f"/CN={name}",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], "making the test CA")
        return ca
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def _make_certificates(dir: Path) -> Path:
    """A CA and a server certificate for ``localhost`` (not 127.0.0.1: the
    name check has something to fail on), in ``dir``. The CA's file."""
    ca = make_ca(dir)
    key, crt = dir / "server.key", dir / "server.crt"
    openssl = shutil.which("openssl")
    if openssl is not None:
        csr, ext = dir / "server.csr", dir / "server.ext"
        _run([openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"], "making the server key")
        ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
        _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(dir / "ca.key"),
              "-CAcreateserial", "-out", str(crt), "-days", "3650", "-extfile", str(ext)],
             "signing the server certificate")
    else:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        ca_key = serialization.load_pem_private_key((dir / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
        server_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(server_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(ca, 0o644)
    return ca


def _rows_as_text(rows) -> str:
    """Rows as ``mariadb -N -B`` prints them: tab-separated, NULL as NULL."""

    def cell(v) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, (bytes, bytearray)):
            return bytes(v).decode("utf-8", "replace")
        return str(v)

    return "\n".join("\t".join(cell(v) for v in row) for row in rows)


#: Result values as the server sends them (text), as the CLI prints them.
_TEXT_ONLY = {k: v for k, v in pymysql.converters.conversions.items() if not isinstance(k, int)}


class Server:
    """A MariaDB server the tests administer."""

    def __init__(self, host: str, port: int, admin: dict, local: Optional[dict] = None):
        #: Host and port drivers connect to (TCP).
        self.host = host
        self.port = port
        #: PyMySQL arguments of an administrator.
        self.admin = admin
        self.local = local
        self.child: Optional[subprocess.Popen] = None

    # -- starting -------------------------------------------------------------------

    @classmethod
    def external(cls, url: str) -> "Server":
        parts = urllib.parse.urlsplit(url if "://" in url else "mysql://" + url)
        admin = {
            "host": parts.hostname or "localhost",
            "port": parts.port or 3306,
            "user": urllib.parse.unquote(parts.username or "root"),
            "password": urllib.parse.unquote(parts.password or ""),
        }
        s = cls(admin["host"], admin["port"], admin)
        s.create_account()
        return s

    @classmethod
    def start_local(cls) -> "Server":
        if not MARIADBD.exists() or not INSTALL_DB.exists():
            raise Unavailable(
                f"MariaDB server binaries are missing ({MARIADBD}): the centralized driver's MySQL "
                "tests need a real server. Install it with `apt-get install -y mariadb-server`, or "
                f"point {MARIADB_ENV} at a running server (mysql://root:password@host:port/)"
            )
        _stop_abandoned()
        as_mysql = os.geteuid() == 0
        dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (dir / "owner.pid").write_text(str(os.getpid()))
        ca = _make_certificates(dir)
        if as_mysql:
            _run(["chown", "-R", "mysql:mysql", str(dir)], "chown of the MariaDB directory")
        install = [str(INSTALL_DB), "--no-defaults", f"--datadir={dir / 'data'}",
                   "--auth-root-authentication-method=normal", "--skip-test-db"]
        if as_mysql:
            install.append("--user=mysql")
        _run(install, "mariadb-install-db")
        s = cls(
            "127.0.0.1",
            _free_port(),
            {"unix_socket": str(dir / "mariadb.sock"), "user": "root", "password": ""},
            {"dir": dir, "as_mysql": as_mysql, "ca": ca},
        )
        atexit.register(s.remove)
        s.start()
        s.create_account()
        return s

    def start(self) -> None:
        """Start our server (again), waiting until it takes connections."""
        dir = self.local["dir"]
        cmd = [
            str(MARIADBD), "--no-defaults",
            f"--datadir={dir / 'data'}",
            f"--socket={dir / 'mariadb.sock'}",
            f"--pid-file={dir / 'mariadb.pid'}",
            f"--log-error={dir / 'server.log'}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--max-connections=300",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            # The kernel keeps what a killed server wrote; commits stay
            # synchronous to the server.
            "--innodb-flush-log-at-trx-commit=2",
            f"--ssl-ca={self.local['ca']}",
            f"--ssl-cert={dir / 'server.crt'}",
            f"--ssl-key={dir / 'server.key'}",
            "--require-secure-transport=ON",
        ]
        if self.local["as_mysql"]:
            cmd.append("--user=mysql")
        self.child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while True:
            try:
                self._admin_connection().close()
                return
            except pymysql.err.MySQLError:
                pass
            if self.child.poll() is not None or time.monotonic() - started > 60:
                log = (dir / "server.log").read_text(errors="replace") if (dir / "server.log").exists() else ""
                raise RuntimeError(f"MariaDB did not start: {log[-4000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop our server at once (connections are cut, as in a crash)."""
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None

    def remove(self) -> None:
        """Stop our server and remove its directory (end of the session)."""
        if self.local is None:
            return
        self.stop()
        _kill_pid_file(self.local["dir"])
        shutil.rmtree(self.local["dir"], ignore_errors=True)

    @property
    def tls_ca(self) -> Optional[Path]:
        """The CA of our server's certificate (None for an external server)."""
        return self.local["ca"] if self.local else None

    @property
    def is_local(self) -> bool:
        return self.local is not None

    # -- administering ----------------------------------------------------------------

    def _admin_connection(self, database: Optional[str] = None) -> pymysql.Connection:
        return pymysql.connect(
            **self.admin,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            client_flag=CLIENT.MULTI_STATEMENTS,
            conv=_TEXT_ONLY,
            connect_timeout=10,
        )

    def admin_sql(self, database: Optional[str], sql: str) -> str:
        """Run SQL (one or more statements) as the administrator (in
        ``database``, if any); the last result's rows as ``mariadb -N -B``
        prints them."""
        conn = self._admin_connection(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                rows = cur.fetchall() if cur.description else None
                while cur.nextset():
                    if cur.description:
                        rows = cur.fetchall()
            return _rows_as_text(rows or [])
        finally:
            conn.close()

    def create_account(self) -> None:
        self.admin_sql(
            None,
            f"CREATE USER IF NOT EXISTS 'cache_admin'@'%' IDENTIFIED BY '{PASSWORD}'; "
            "GRANT ALL PRIVILEGES ON *.* TO 'cache_admin'@'%'",
        )

    def url(self, account: str, database: str, tls: str) -> str:
        """A URL of ``account`` for ``database`` over TCP (with TLS
        parameters ``tls``, e.g. ``?ssl_ca=...``)."""
        return f"mysql+pymysql://{account}:{PASSWORD}@{self.host}:{self.port}/{database}{tls}"

    def default_tls(self) -> str:
        """The TLS parameters our server needs (encrypted, the certificate
        not checked; the TLS test checks it)."""
        return "?ssl_mode=REQUIRED" if self.local else ""

    def database(self) -> "TestDatabase":
        """A new database as an operator sets it up: Glance's two tables (as
        its migration makes them), the drivers' account granted what
        ``image-cache db grants --mysql`` prints."""
        db = self.bare_database()
        for table in GLANCE_CACHE_SCHEMA:
            db.sql(table)
        db.grant_cache_privileges(db.name)
        return db

    def bare_database(self) -> "TestDatabase":
        """A new, empty database, and its drivers' account with nothing yet."""
        name = f"icpy_{os.getpid()}_{next(_names)}"
        self.admin_sql(None, f"CREATE DATABASE {name}; CREATE USER '{name}'@'%' IDENTIFIED BY '{PASSWORD}'")
        return TestDatabase(self, name)


class TestDatabase:
    """A database of one test."""

    __test__ = False  # not a pytest class

    def __init__(self, server: Server, name: str):
        self.server = server
        self.name = name
        #: As the drivers' account (named as the database), with its
        #: password, over TCP.
        self.url = server.url(name, name, server.default_tls())
        #: As an account with every privilege.
        self.admin_url = server.url("cache_admin", name, server.default_tls())
        self._roots: List[DatabaseRoot] = []

    def sql(self, sql: str) -> str:
        """Run SQL as the administrator in this database."""
        return self.server.admin_sql(self.name, sql)

    def grant_cache_privileges(self, account: str) -> None:
        """Run what ``image-cache db grants --mysql`` prints for ``account``."""
        self.server.admin_sql(None, "\n".join(grant_statements(account, self.name)))

    def root_with(self, settings: DatabaseSettings) -> DatabaseRoot:
        root = DatabaseRoot().with_database(CENTRALIZED_DATABASE, settings)
        self._roots.append(root)
        return root

    def root(self, **settings) -> DatabaseRoot:
        """The databases a cache may open: this one as ``glance``."""
        return self.root_with(DatabaseSettings(self.url, **settings))

    def privileged_root(self, **settings) -> DatabaseRoot:
        """This database as the administrator (every privilege), allowed:
        for what a fenced account could not even try."""
        return self.root_with(DatabaseSettings(self.admin_url, allow_privileged_role=True, **settings))

    def close(self) -> None:
        for root in self._roots:
            root.close()


_shared: Optional[Server] = None


def shared() -> Server:
    """The server of this test session (raises :class:`Unavailable`)."""
    global _shared
    if _shared is None:
        url = os.environ.get(MARIADB_ENV, "").strip()
        _shared = Server.external(url) if url else Server.start_local()
    return _shared
