"""Secret masking for everything the runbook prints or writes: log lines, run records,
errors, `status --format json`.

A module of its own because the adapters (database, docker, compose, snapshots) mask their
errors too and must not import the journal (which imports them) to do it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from typing import Any

from runbook.times import format_rfc3339 as format_time

MASK = "***"
# How a fix writes a URL's password (postgresql://USER:<password>@HOST...): kept by the URL
# pattern after `USER:`, or the hint read `USER:***@HOST`. A real password written so is a
# known secret, masked as every known value is.
PLACEHOLDER = "<password>"
MIN_SECRET_LENGTH = 4  # shorter known values would mask ordinary words
STRONG_SECRET_LENGTH = 6  # a known value this long, of mixed kinds, is masked even in a word

# `pass` only as the end of a key's name after `_` (DB_PASS, SMTP_PASS, PGPASS) or a key of
# its own (PASS=), never inside a word (bypass, passed, compass), after `-` or `.` (a host
# mail-pass.example.org, a file ..._pre-pass.sql.gz: found by review) nor alone ("checks
# pass: 3"); Laravel's APP_KEY. Found by review: DB_PASS=... and an app quoting its APP_KEY
# were printed in clear. Letters only, no `\w`: the env pattern below upper-cases it all.
_WORDS = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key" \
         r"|app[_-]?key|credentials?|(?<=_)pass(?![a-z])|pgpass(?![a-z])" \
         r"|(?<![a-z0-9_.-])pass(?==))"
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"(?=[\s,;}\]]|$)|'[^']*'(?=[\s,;}\]]|$)"
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = []


def _quoted_mask(value: str) -> str:
    return f"{value[0]}{MASK}{value[0]}" if value[:1] in ("'", '"') else MASK


# scheme://user:PASSWORD@host - the password may hold @ % / : (greedy to the last @); also
# scheme:/user:PASSWORD@host, a URL that went through a path (pathlib folds the `//`)
_PATTERNS.append((
    re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*:/{1,2}[^\s:/]*:)(?P<pw>\S*)@"),
    lambda m: m[0] if m["pre"].endswith("://USER:") and m["pw"] == PLACEHOLDER
    else f"{m['pre']}{MASK}@",
))
# POSTGRES_PASSWORD=..., JWT_SECRET="...": env style, the value runs to whitespace
_PATTERNS.append((
    re.compile(r"\b(?P<key>[A-Z][A-Z0-9_]*" + _WORDS.upper().replace("[_-]", "_")
               + r"[A-Z0-9_]*)=(?P<value>" + _QUOTED + r"|\S*)"),
    lambda m: f"{m['key']}={_quoted_mask(m['value'])}",
))
# password=..., "api_key"="...", db.password = ... (query strings stop at &)
_PATTERNS.append((
    re.compile(r"(?i)\b(?P<key>[\w.-]*" + _WORDS + r"[\w.-]*)(?P<sep>[\"']?\s*=\s*)"
               r"(?P<value>" + _QUOTED + r"|[^\s&;,\"']+)"),
    lambda m: f"{m['key']}{m['sep']}{_quoted_mask(m['value'])}",
))
# token: ..., "api_key": "...": the key a whole word, never a path's last part nor a file's
# name. A path holding a secret-looking word, then `: ` as every OSError says it, had the
# next word masked as its value (".env.production.secret: *** such file or directory",
# "production-secrets.toml: *** valid TOML"; found by review)
_FILE_NAME = "".join(rf"(?<!\.{ext})" for ext in ("toml", "json", "yaml", "yml", "conf", "txt",
                                                   "log"))
_PATTERNS.append((
    re.compile(r"(?i)(?<![\w./-])(?P<key>[\w.-]*" + _WORDS + r"[\w.-]*)" + _FILE_NAME
               + r"(?P<sep>[\"']?\s*:\s*)(?P<value>" + _QUOTED + r"|[^\s&;,\"']+)"),
    lambda m: f"{m['key']}{m['sep']}{_quoted_mask(m['value'])}",
))
# --password SECRET, --pass SECRET, --smtp-pass SECRET (in a flag `-pass` is the word)
_FLAG_WORDS = r"(?:" + _WORDS + r"|(?<=-)pass(?![a-z]))"
_PATTERNS.append((
    re.compile(r"(?i)(?P<flag>--?[\w-]*" + _FLAG_WORDS + r"[\w-]*)\s+(?P<value>(?!-)\S+)"),
    lambda m: f"{m['flag']} {MASK}",
))
# Authorization: Bearer xxx / Basic xxx
_PATTERNS.append((
    re.compile(r"(?i)\b(?P<kind>bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    lambda m: f"{m['kind']} {MASK}",
))
# A password hash (bcrypt, as `caddy hash-password` prints it, or base64-encoded as Caddy's
# basicauth also takes it): a Caddyfile's basic-auth line beside the managed block sits in the
# plan's diff, and a bcrypt hash is a password to crack offline (found by review)
_PATTERNS.append((
    re.compile(r"\$2[abxy]?\$\d{2}\$[./A-Za-z0-9]{53}|(?<![A-Za-z0-9+/])JDJ[hi45]J[A-Za-z0-9+/]"
               r"{70,}={0,2}"),
    lambda m: MASK,
))
# What every pattern above needs somewhere in the text (a URL password its `@`, the rest a
# secret word or an auth scheme): text without any of it is left as is without running them.
_MAY_MATCH = re.compile(r"(?i)@|" + _FLAG_WORDS + r"|bearer|basic|\$2|JDJ")
_SECRET_FLAG = re.compile(r"(?i)--?(?!no-)[\w-]*" + _FLAG_WORDS + r"[\w-]*")  # not --no-password
_SECRET_KEY = re.compile(r"(?i)" + _WORDS + r"|authorization|dsn|database_url")


_PASSWORD_IN_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:[^\s@]+@")
# libpq takes a password as a key too: in a URL's query string (`...?password=x`) and in a
# key=value connection string (`host=db password=x`); an empty one holds none
_PASSWORD_KEY = re.compile(r"(?i)(?:^|[?&\s])(?:ssl)?password\s*=\s*[^\s&]")
_SECRET_NAME = re.compile(r"(?i)" + _WORDS + r"|authorization|^pass(?![a-z])")  # PASS=
_NAMES_A_PLACE = re.compile(r"(?i)_(?:file|path|dir)$")


def holds_secret(name: str, value: str) -> bool:
    """Whether an environment variable carries a secret itself: a URL with a password in its
    value (user:password@ or ?password=), a libpq `password=` key (host=db password=...),
    or a secret's name (*_PASSWORD, *_TOKEN, ...) with a value that is not a path to a file
    holding it (GOOGLE_APPLICATION_CREDENTIALS=/etc/..., TOKEN_FILE=...)."""
    if _PASSWORD_IN_URL.search(value) or _PASSWORD_KEY.search(value):
        return True
    if not value or value.startswith(("/", "./", "~")) or _NAMES_A_PLACE.search(name):
        return False
    return bool(_SECRET_NAME.search(name))


# The env-file keys whose value is a secret by name alone (known_secrets): the name ENDS in
# a secret word. A key merely holding one (SECRETS_BACKEND, API_TOKEN_ISSUER,
# ACCESS_TOKEN_TTL) is not: its ordinary value was masked everywhere (found by review).
_SECRET_NAME_END = re.compile(r"(?i)(?:^|_)(?:pass|passwd|pwd|secret|token|key|credentials)$"
                              r"|password$|(?:^|_)pgpass$")
_PASSWORD_NAME_END = re.compile(r"(?i)password$|(?:^|_)(?:pass|passwd|pwd|pgpass)$")


def secret_by_name(name: str, value: str) -> bool:
    """Whether an env-file value is a known secret for its key's name: a name ending in a
    secret word (*PASSWORD, *_PASS, *_PWD, *_SECRET, *_TOKEN, *_KEY, *_CREDENTIALS,
    PGPASS), not a path to a file holding it, and, but for a password's, no ordinary word
    or number (_weak: `JWT_KEY=HS256`, `SESSION_TOKEN=3600` would mask those everywhere)."""
    if not holds_secret(name, value) or not _SECRET_NAME_END.search(name):
        return False
    return bool(_PASSWORD_NAME_END.search(name)) or not _weak(value)


def holds_password(value: str) -> bool:
    """Whether a value holds a password itself: a URL's user:password@ or a libpq key."""
    return bool(_PASSWORD_IN_URL.search(value) or _PASSWORD_KEY.search(value))


_REGISTERED: set[str] = set()  # this process's known secret values (the database password)


def register_secrets(*values: str) -> None:
    """Known secret values every later redact() masks, whoever calls it and whatever the text
    looks like (a misencoded URL defeats the patterns below, a known value does not)."""
    _REGISTERED.update(v for v in values if v)


# What may touch a weak known value without it being masked there: a weak value inside a
# longer name or word (`togather` in togather-server-blue, `2025` in 2025-03-01) is that
# word, not the password.
_WORD_CHAR = r"[A-Za-z0-9_.-]"
# ...but an escape one_line() or repr() wrote before it (`\n`, `\x1b`, `\u202e`) ends the
# word before: `using\nSesame` is a newline and the password (found by review).
_AFTER_ESCAPE = r"(?<=\\[abfnrtv])|(?<=\\x[0-9a-f]{2})|(?<=\\u[0-9a-f]{4})" \
                r"|(?<=\\U[0-9a-f]{8})"


def _weak(value: str) -> bool:
    """A value that is also an ordinary word or number (`togather`, `green`, `2025`): short,
    or all letters, all digits or all punctuation. Masked only where it stands alone."""
    classes = {"a" if c.isalpha() else "0" if c.isdigit() else "." for c in value}
    return len(value) < STRONG_SECRET_LENGTH or len(classes) < 2


def _escaped(value: str) -> tuple[str, ...]:
    """`value` as repr() and json.dumps() write it inside a string, its `\\` and `"`
    escaped (repr escapes `'` or not by the whole text's quotes, JSON non-ASCII or not by
    ensure_ascii: both ways)."""
    in_repr = "".join(repr(c)[1:-1] for c in value)  # repr's escapes, char by char
    return (in_repr, in_repr.replace("'", "\\'"), json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1])


@functools.lru_cache(maxsize=64)
def _forms(known: frozenset[str]) -> tuple[tuple[str, ...], re.Pattern[str] | None]:
    """Each known value and its encoded forms: percent-encoded (`/` kept or not, space as
    `+`), one_line()'s, repr()'s and JSON's, and those escaped once more (the journal's
    `exception=repr(exc)` of an error quoting a JSON body); a password holding a `\\` or
    a `"` passed as written. A value's longest form first (an escaped one can hold the
    value as written: no stray `\\` left). The strong values longest first, to mask
    wherever they appear; the weak ones as one pattern that masks them only as a whole
    token (no letter, digit, `_` `.` `-` either side).
    Cached: the journal redacts every string of its record at each write, and quote() per
    value per string was most of a fast run's journaling CPU."""
    strong: list[str] = []
    weak: list[str] = []
    for value in sorted(known, key=len, reverse=True):
        into = weak if _weak(value) else strong
        once = _escaped(value)
        twice = (again for form in once for again in _escaped(form))
        forms = dict.fromkeys((value, urllib.parse.quote(value, safe=""),
                               urllib.parse.quote(value), urllib.parse.quote_plus(value),
                               one_line(value), *once, *twice))
        into.extend(sorted(forms, key=len, reverse=True))
    if not weak:
        return tuple(strong), None
    alternatives = "|".join(re.escape(v) for v in sorted(weak, key=len, reverse=True))
    return tuple(strong), re.compile(f"(?:(?<!{_WORD_CHAR})|{_AFTER_ESCAPE})"
                                     f"(?:{alternatives})(?!{_WORD_CHAR})")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask secrets in free text: URL passwords, *_SECRET=, password=, token=, known values."""
    known = frozenset(s for s in (*secrets, *_REGISTERED) if s and len(s) >= MIN_SECRET_LENGTH)
    strong, weak = _forms(known)
    for form in strong:
        text = text.replace(form, MASK)
    if weak is not None:
        text = weak.sub(MASK, text)
    if _MAY_MATCH.search(text) is None:
        return text
    for pattern, replace in _PATTERNS:
        text = pattern.sub(replace, text)
    return text


def _secret_named(name: str, item: Any) -> bool:
    """Under a secret's name any value is masked (a list, a number, an object: only a string
    was); a URL keeps its host (its password masked); null and a bool hold no secret."""
    return bool(_SECRET_KEY.search(name)) and not (
        item is None or isinstance(item, bool) or (isinstance(item, str) and "://" in item))


def _after_secret_flag(previous: Any, item: Any) -> bool:
    """argv: ["psql", "--password", "hunter2"] masks the value after the flag."""
    return isinstance(previous, str) and isinstance(item, str) \
        and _SECRET_FLAG.fullmatch(previous) is not None


JSONPath = tuple[str | int, ...]


def mask_document(doc: Any) -> tuple[Any, list[JSONPath]]:
    """A parsed JSON document with its secrets masked by the journal's rules (a string whose
    redact() differs, a value under a secret's name, the value after a secret flag), and the
    paths of what was masked, in the document's order. Unlike _clean, every key, every
    container and every value without a secret stays as it was: the masked document is still
    the same file (the state file's kept copy, runbook/kept_state.py; masking its text ate a
    closing quote). Under a secret's name an object or a list keeps its keys, each value in
    it masked; a key holding a secret itself is masked as a value is."""
    found: list[JSONPath] = []

    def walk(value: Any, path: JSONPath, secret: bool) -> Any:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                name = redact(key)
                if name != key:
                    found.append((*path, name))
                out[name] = walk(item, (*path, name), secret or _secret_named(key, item))
            return out
        if isinstance(value, list):
            return [walk(item, (*path, i), secret or _after_secret_flag(
                value[i - 1] if i else None, item)) for i, item in enumerate(value)]
        if value is None or isinstance(value, bool):
            return value
        if secret and not (isinstance(value, str) and "://" in value):
            shown: Any = MASK
        else:
            shown = redact(value) if isinstance(value, str) else value
        if shown != value:
            found.append(path)
        return shown

    return walk(doc, (), False), found


def _clean(value: Any, known: Iterable[str], depth: int = 0) -> Any:
    """JSON-safe and redacted: whatever a caller passes, the line stays one valid object."""
    if depth > 20:
        return "<too deep>"
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact(value, known)
    if isinstance(value, datetime):
        return format_time(value) if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            out[name] = MASK if _secret_named(name, item) else _clean(item, known, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        out_list: list[Any] = []
        previous: Any = None
        for item in value:
            out_list.append(MASK if _after_secret_flag(previous, item)
                            else _clean(item, known, depth + 1))
            previous = item
        return out_list
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"), known)
    return redact(str(value), known)


def one_line(text: str) -> str:
    """`text` with its control and format characters (newline, ESC, bidi overrides) escaped
    as \\n, \\x1b, \\u202e: a value another tool wrote (a lock's holder) cannot print a
    forged line of its own. Here beside redact(), for modules status.py imports (the lock)."""
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
                   for ch in text)


def scrub(value: Any) -> Any:
    """`value` made JSON-safe with every secret masked, for output that is not a log line."""
    return _clean(value, ())
