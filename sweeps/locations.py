"""Where things are kept: store URLs and output folders, checked before anything is written,
and shown everywhere without their secrets.

A URL is read the way its driver reads it, so that the check refuses what the driver would
misread: SQLAlchemy takes everything up to the first `@` as the password, so an unencoded `@`
in a password sends the rest of it to DNS as a host name (and into the driver's error).
Masking errs the other way: everything up to the last `@` is treated as credentials.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from batchscope.sweeps.errors import UserError

MASK = "***"
STORAGE_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite", "redis", "rediss")
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "postgres", "mysql", "mssql", "file")
_SQL_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "sqlite")  # parsed by SQLAlchemy
_DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")  # a server that needs a database name
_NOT_FOR_FILES = (Path("/proc"), Path("/sys"))  # kernel views: nothing written there is kept

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A URL inside free text (an error message): it ends at white space, quotes or angle brackets.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
# Secrets passed as parameters: ?password=..., &access_key=..., or libpq's `password=...` in a DSN.
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|(?<=[?&;\s]))[^\s=&#?;'\"]*(?:pass|pwd|token|secret|key|auth|cred|sig)[^\s=&#?;'\"]*=)[^\s&#;'\"]*"
)


# ---- masking ------------------------------------------------------------------


def redact(text: str | None) -> str:
    """`text` with every credential in it replaced by ***: the password of `user:pw@host` (all of
    it up to the last `@`, so an unencoded `@` in it leaks nothing), Redis's `:pw@host`, a bare
    `token@host` for http(s), and `password=`/`token=`/`secret=`/`...key=` parameters.

    `text` may be one URL (a password with spaces is still masked whole) or a message that
    contains URLs.
    """
    if not text:
        return ""
    if _SCHEME.match(text):
        text = _redact_authority(text)
    else:
        text = _URL_IN_TEXT.sub(lambda m: _redact_authority(m.group(0)), text)
    return _SECRET_PARAM.sub(rf"\1{MASK}", text)


def scrub(text: str, url: str) -> str:
    """A driver's message made safe to show: redacted, and the secrets of `url` (as written and
    percent-decoded) removed wherever the driver echoed them outside a URL."""
    text = redact(text)
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _redact_authority(url: str) -> str:
    """One URL with the credentials before its host masked."""
    m = _SCHEME.match(url)
    if m is None:
        return url
    head, rest = url[: m.end()], url[m.end() :]
    userinfo, _, after = _split_userinfo(rest)
    if userinfo is None:
        return url
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{head}{user}:{MASK}@{after}"
    if m.group(1).lower() in ("http", "https"):  # https://TOKEN@host: the name is the secret
        return f"{head}{MASK}@{after}"
    return url


def _split_userinfo(rest: str) -> tuple[str | None, int, str]:
    """(userinfo, number of `@` in it, what follows) of the part after `scheme://`; userinfo is
    everything before the last `@`, unless what precedes its first `:` is a path (then there is none)."""
    at = rest.rfind("@")
    if at < 0:
        return None, 0, rest
    userinfo = rest[:at]
    if any(c in userinfo.partition(":")[0] for c in "/?#"):
        return None, 0, rest
    return userinfo, userinfo.count("@") + 1, rest[at + 1 :]


def _secrets(url: str) -> set[str]:
    """The literal secrets in `url`, as written and percent-decoded (short ones would mask noise)."""
    found: set[str] = set()
    m = _SCHEME.match(url)
    if m is not None:
        userinfo, _, _ = _split_userinfo(url[m.end() :])
        if userinfo is not None and ":" in userinfo:
            found.add(userinfo.partition(":")[2])
    for pm in _SECRET_PARAM.finditer(url):
        found.add(url[pm.end(1) : pm.end()])
    found |= {unquote(s) for s in found}
    return {s for s in found if len(s) >= 3}


# ---- parsing ------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedUrl:
    """A store URL cut the way its driver cuts it (empty strings where a part is absent)."""

    scheme: str  # lower case, driver included: "postgresql+psycopg"
    at_signs: int  # `@` between the credentials and the host; more than 1 means an unencoded `@`
    host: str
    port: str
    path: str  # after the host and its `/`, without the query
    query: str

    @property
    def base(self) -> str:
        """The scheme without its driver: "postgresql+psycopg" → "postgresql"."""
        return self.scheme.split("+", 1)[0]


def parse(url: str) -> ParsedUrl | None:
    """The URL's parts, or None when `url` has no `scheme://`."""
    m = _SCHEME.match(url)
    if m is None:
        return None
    _userinfo, at_signs, after = _split_userinfo(url[m.end() :])
    hostport = re.split(r"[/?#]", after, maxsplit=1)[0]
    path, _, query = after[len(hostport) :].partition("#")[0].partition("?")
    host, port = _host_port(hostport)
    return ParsedUrl(m.group(1).lower(), at_signs, host, port, path.removeprefix("/"), query)


def _host_port(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):  # [::1]:5432
        host, _, port = hostport[1:].partition("]")
        return host, port.removeprefix(":")
    host, _, port = hostport.partition(":")
    return host, port


# ---- checks -------------------------------------------------------------------


def check_storage(url: str, field: str = "storage", *, writing: bool = True) -> str:
    """Refuse an Optuna storage that cannot work, in one line naming `field` and the fix; nothing
    is touched. Returns the URL as the driver needs it (`postgres://` becomes `postgresql://`)."""
    parsed = parse(url)
    if parsed is None:
        _refuse_scheme_without_slashes(url, field, STORAGE_SCHEMES)
        check_file_location(url, field, writing=writing)
        return url
    if parsed.base not in STORAGE_SCHEMES:
        raise UserError(
            f"{field} {redact(url)!r}: unsupported scheme {parsed.scheme!r}; use a file path, "
            "postgresql://USER:PASSWORD@HOST/DB, mysql+pymysql://..., sqlite:///PATH or redis://HOST:6379"
        )
    return _check_server_url(url, parsed, field, writing=writing)


def check_tracking_uri(uri: str, field: str = "tracking_uri", *, writing: bool = True) -> str:
    """Refuse an MLflow tracking URI that cannot work, in one line naming `field` and the fix;
    nothing is touched. Returns the URI as MLflow needs it."""
    parsed = parse(uri)
    if uri.startswith("file:") or parsed is None:
        return _check_file_store(uri, field, writing=writing)
    if parsed.base not in TRACKING_SCHEMES:
        raise UserError(
            f"{field} {redact(uri)!r}: unsupported scheme {parsed.scheme!r}; use http://HOST:5000 (batchscope "
            "server), sqlite:///PATH/mlflow.db or postgresql://USER:PASSWORD@HOST/DB, or leave it out for mlruns/"
        )
    if parsed.base in ("http", "https"):
        if not parsed.host:
            raise UserError(f"{field} {redact(uri)!r} names no host; write it as {parsed.scheme}://HOST:5000")
        _check_port(uri, parsed, field)
        return uri
    return _check_server_url(uri, parsed, field, writing=writing)


def _check_server_url(url: str, parsed: ParsedUrl, field: str, *, writing: bool) -> str:
    """The checks shared by storage and tracking URLs of databases and Redis."""
    if parsed.base == "sqlite":
        return _check_sqlite(url, field, writing=writing)
    if parsed.at_signs > 1 and parsed.base in _SQL_SCHEMES:  # redis-py and http clients take the last `@`
        raise UserError(
            f"{field} {redact(url)!r}: the password contains an unencoded '@', which the driver would read "
            "as the start of the host; write each '@' in it as %40"
        )
    _check_port(url, parsed, field)
    if parsed.base in ("redis", "rediss"):
        if not parsed.host:
            raise UserError(
                f"{field} {redact(url)!r} names no host; write it as redis://HOST:6379 (or redis://HOST/DB)"
            )
        if parsed.path.strip("/") and not parsed.path.strip("/").isdigit():
            raise UserError(f"{field} {redact(url)!r}: the Redis database must be a number, as in redis://HOST:6379/0")
        return url
    if parsed.base in _DATABASE_SCHEMES and not parsed.path.strip("/"):
        # Without one, PostgreSQL connects to the user's default database and Optuna makes its tables there.
        raise UserError(
            f"{field} {redact(url)!r} names no database; write it as {parsed.scheme}://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    if parsed.base == "postgres":  # SQLAlchemy knows only the long name
        return "postgresql" + url[len("postgres") :]
    return url


def _check_port(url: str, parsed: ParsedUrl, field: str) -> None:
    if parsed.port and not (parsed.port.isdigit() and 0 < int(parsed.port) < 65536):
        raise UserError(f"{field} {redact(url)!r}: port {parsed.port!r} is not a number from 1 to 65535")


def _check_sqlite(url: str, field: str, *, writing: bool) -> str:
    """sqlite:///relative/path or sqlite:////absolute/path; never an in-memory database."""
    rest = url[len("sqlite://") :] if url.lower().startswith("sqlite://") else ""
    path = rest[1:].partition("?")[0] if rest.startswith("/") else ""
    if not path or path == ":memory:":
        raise UserError(
            f"{field} {redact(url)!r} names no file (an in-memory database keeps nothing); "
            "write it as sqlite:///PATH/NAME.db (four slashes for an absolute path)"
        )
    check_file_location(path, field, shown=url, writing=writing)
    return url


def _check_file_store(uri: str, field: str, *, writing: bool) -> str:
    """MLflow's file store (`file:` or a bare path): in maintenance mode, and MLflow refuses it
    unless MLFLOW_ALLOW_FILE_STORE is set; anything else without a scheme is not a URI at all."""
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    if uri.startswith("file:") and allowed:
        path = re.sub(r"^file:(//)?", "", uri)
        check_file_location(path or ".", field, shown=uri, writing=writing)
        return uri
    if uri.startswith("file:"):
        raise UserError(
            f"{field} {redact(uri)!r}: MLflow's file store is in maintenance mode and MLflow refuses it; "
            "use sqlite:///PATH/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"
        )
    raise UserError(
        f"{field} {redact(uri)!r} is not a tracking URI; use http://HOST:5000 (batchscope server), "
        "sqlite:///PATH/mlflow.db or postgresql://USER:PASSWORD@HOST/DB, or leave it out for mlruns/"
    )


def _refuse_scheme_without_slashes(url: str, field: str, schemes: tuple[str, ...]) -> None:
    """`postgresql:host/db` or `sqlite:x.db` would otherwise be taken for a file name."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    if m is not None and m.group(1).lower().split("+")[0] in (*schemes, "http", "https"):
        raise UserError(f"{field} {redact(url)!r} is malformed; a URL starts with {m.group(1)}://")


def check_file_location(path: str | Path, field: str, *, shown: str | None = None, writing: bool = True) -> None:
    """A store file that can be kept at `path`: not under /proc or /sys, not a folder, and, if it is
    to be created, inside a folder that is (or can be made) writable. Nothing is created."""
    where = redact(shown if shown is not None else str(path))
    target = Path(os.path.abspath(os.path.expanduser(path)))
    _refuse_kernel_folder(target, field, where)
    if target.is_dir():
        raise UserError(f"{field} {where!r} is a folder; give the path of a file inside it")
    if target.exists():
        if writing and not os.access(target, os.W_OK):
            raise UserError(f"{field} {where!r} is not writable; give a file you can write")
        return
    if writing:
        _check_creatable(target.parent, field, where)


def check_output_folder(path: str | Path, field: str) -> Path:
    """A folder for output files: an existing folder, or one that can be made; never an existing
    file, never under /proc or /sys. Nothing is created. Returns the absolute path."""
    target = Path(os.path.abspath(os.path.expanduser(path)))
    _refuse_kernel_folder(target, field, str(path))
    if target.exists() and not target.is_dir():
        raise UserError(f"{field} {str(path)!r} is a file, not a folder; give a folder (it is made if missing)")
    _check_creatable(target, field, str(path))
    return target


def _refuse_kernel_folder(target: Path, field: str, where: str) -> None:
    real = target.resolve()
    for kernel in _NOT_FOR_FILES:
        if real == kernel or kernel in real.parents:
            raise UserError(f"{field} {where!r} is under {kernel}, which keeps no files; choose a folder you can write")


def _check_creatable(folder: Path, field: str, where: str) -> None:
    """`folder` exists and is writable, or its nearest existing parent is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{field} {where!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{field} {where!r}: the folder {existing} is not writable; choose a folder you can write")
