"""An env file (`/opt/togather/.env.<env>`) read as Docker Compose reads it.

Compose (compose-go's dotenv, the parser of `env_file:` and `--env-file`) expands `$VAR` and
`${VAR...}` in unquoted and double-quoted values, looking a variable up in the process's
environment first, then among the keys above it in the same file; `$$` is a literal `$`;
single-quoted values stay as written; double-quoted ones read their escapes (`\\"`, `\\\\`,
`\\n`, `\\$`, ...) and may run over several lines. A host may build DATABASE_URL from its
POSTGRES_* keys (CONTRACTS): read literally, the runbook used `${POSTGRES_PORT}` as a port and
blamed the database (found by review on a drill stack). tests/test_env_interpolation.py
checks this reading against `docker compose config` itself.

Where no Compose reads the file (slots made by `docker run --env-file`), docker passes every
value as written: `pa$word` is the app's password, and expanding it refused a URL the app uses
(found by review). parse_literal is that reading; the caller says which one applies.

Only the standard library here: runbook.environment imports it at every start.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
# Compose's escapes inside double quotes (Go's, and `\0NNN` octal); any other `\x` stays
_ESCAPE = re.compile(r'\\(?:[abcfnrtv$"\\]|0[0-9]{0,3})')
_ESCAPED = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            '"': '"', "\\": "\\", "$": "$$"}  # `\$` is `$$`: a literal `$` once expanded
_OPERATORS = (":-", ":+", ":?", "-", "+", "?")  # the two-character ones first
Problem = tuple[str, str]  # EnvEntry.unresolved: (variable, form); ("", "") none
RESOLVED: Problem = ("", "")
Lookup = Callable[[str], tuple[str, Problem] | None]  # a variable's value and its problem


@dataclass(frozen=True)
class EnvEntry:
    """One key of an env file. `written`: its value with quotes and escapes read, before any
    `${...}` (what the agreement checks judge, runbook/environment/schema.py); `value`: as
    Compose reads it (an unset variable empty, as Compose makes it); `unresolved`: why that
    value is not what the host's tooling means, `(variable, form)`: form "" a variable set
    nowhere (Compose warns, and substitutes nothing), ":?" / "?" a required one unset
    (Compose refuses the file), "invalid" a `${...}` Compose cannot read (its variable "");
    ("", "") when resolved. A key built on an unresolved one is unresolved too."""

    written: str
    value: str
    unresolved: Problem = ("", "")

    @property
    def resolved(self) -> bool:
        return self.unresolved == RESOLVED


def _closing_brace(text: str, start: int) -> int:
    """The `}` that closes the `${` at `start` (nested `${...}` counted), or -1."""
    depth, i = 0, start
    while i < len(text):
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        if text[i] == "{":
            depth += 1
            i += 1  # as Compose counts: the character after a `{` is never a brace
        i += 1
    return -1


def _braced(inner: str, lookup: Lookup) -> tuple[str, Problem]:
    """`${inner}`: a name, then nothing or an operator and its word (expanded itself)."""
    match = _NAME.match(inner)
    if match is None:
        return "", ("", "invalid")
    name, rest = match.group(), inner[match.end():]
    found = lookup(name)
    if not rest:
        return found if found is not None else ("", (name, ""))
    operator = next((op for op in _OPERATORS if rest.startswith(op)), None)
    if operator is None:
        return "", ("", "invalid")
    value, problem = found if found is not None else ("", RESOLVED)
    word, word_problem = expand(rest[len(operator):], lookup)
    if word_problem[1]:  # Compose expands the word first: a refusal there is one here
        return "", word_problem
    is_set, filled = found is not None, value != ""
    if operator in (":-", "-"):
        use_word = not filled if operator == ":-" else not is_set
        return (word, word_problem) if use_word else (value, problem)
    if operator in (":+", "+"):
        use_word = filled if operator == ":+" else is_set
        return (word, word_problem) if use_word else ("", RESOLVED)
    if filled if operator == ":?" else is_set:
        return value, problem
    return "", (name, operator)  # Compose: "required variable ... is missing a value"


def expand(text: str, lookup: Lookup) -> tuple[str, Problem]:
    """`text` with `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME:+word}`,
    `${NAME+word}`, `${NAME:?word}`, `${NAME?word}` and `$$` replaced as Compose replaces
    them; and the first thing unresolved (EnvEntry.unresolved). A `$` before anything else
    (`$5`, a lone `$`) stays, as in Compose."""
    out: list[str] = []
    first = RESOLVED
    i = 0
    while i < len(text):
        dollar = text.find("$", i)
        if dollar < 0:
            out.append(text[i:])
            break
        out.append(text[i:dollar])
        after = text[dollar + 1:dollar + 2]
        if after == "$":
            out.append("$")
            i = dollar + 2
            continue
        if after == "{":
            close = _closing_brace(text, dollar + 1)
            if close < 0:  # `${` never closed: Compose's "Invalid template"
                value, problem = "", ("", "invalid")
                i = len(text)
            else:
                value, problem = _braced(text[dollar + 2:close], lookup)
                i = close + 1
        else:
            match = _NAME.match(text, dollar + 1)
            if match is None:
                out.append("$")
                i = dollar + 1
                continue
            found = lookup(match.group())
            value, problem = found if found is not None else ("", (match.group(), ""))
            i = match.end()
        out.append(value)
        if first == RESOLVED or (problem[1] and not first[1]):
            first = problem  # the first problem; one Compose refuses outranks an unset one
    return "".join(out), first


def _unescape(match: re.Match[str]) -> str:
    said = match.group()[1:]
    if said in _ESCAPED:
        return _ESCAPED[said]
    digits = said[1:]  # `\0NNN`: octal NNN; anything else as Compose leaves it, `\0` -> `\`
    if len(digits) == 3 and set(digits) <= set("01234567") and int(digits, 8) <= 255:
        return chr(int(digits, 8))
    return "\\" + digits


def _quoted(text: str) -> tuple[str, int]:
    """The value inside the quote `text` starts with (`\\<quote>` is the quote; any other
    backslash pair stays for the escapes), and the closing quote's index (-1: none)."""
    quote, escaped = text[0], False
    chars: list[str] = []
    for i in range(1, len(text)):
        char = text[i]
        if char == quote and not escaped:
            return "".join(chars), i
        if char == "\\" and not escaped:
            escaped = True
            continue
        if escaped and char != quote:
            chars.append("\\")
        escaped = False
        chars.append(char)
    return "", -1


def parse_literal(text: str) -> dict[str, EnvEntry]:
    """Every KEY=VALUE of an env file's text, in order, each value exactly as written after
    the first `=`: quotes, `$`, ` #` and spaces kept, only a line's `\r` dropped. That is how
    `docker run --env-file` reads one (docker/cli's opts/envfile.go, checked against docker
    28): lines are cut at `\n` only, a leading space and `#` lines are passed over. A line
    without `=` (docker passes the variable through from its caller's environment, which is
    not the runbook's) or whose key holds a space (`export KEY=`, `KEY =`: docker refuses the
    whole file) is no key here."""
    entries: dict[str, EnvEntry] = {}
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").lstrip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if key and " " not in key and "\t" not in key:  # docker's test: space and tab
            entries[key] = EnvEntry(value, value)
    return entries


def parse(text: str, environ: Mapping[str, str], *,
          interpolate: bool = True) -> dict[str, EnvEntry]:
    """Every KEY=VALUE of an env file's text, in order, expanded as Compose expands them.
    Lines without `=` are passed over, and a quote never closed is kept as written (Compose
    refuses such a file; the runbook has never refused one). `interpolate=False`: read as
    written, as `docker run --env-file` reads it (parse_literal)."""
    if not interpolate:
        return parse_literal(text)
    entries: dict[str, EnvEntry] = {}

    def lookup(name: str) -> tuple[str, Problem] | None:
        if name in environ:  # Compose: the process's environment first
            return environ[name], RESOLVED
        entry = entries.get(name)
        return None if entry is None else (entry.value, entry.unresolved)

    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].lstrip()
        i += 1
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith(("export ", "export\t")):
            line = line[len("export"):].lstrip()
        key, _, value = line.partition("=")
        key, value = key.strip(), value.lstrip()
        if value[:1] in ("'", '"'):
            written, end = _quoted(value)
            if end < 0 and i < len(lines):  # not closed on its line: it may go on below
                value = "\n".join([value, *lines[i:]])
                written, end = _quoted(value)
            if end < 0:  # never closed: the line as written, nothing expanded
                kept = value.split("\n", 1)[0].rstrip()
                entries[key] = EnvEntry(kept, kept)
                continue
            i += value.count("\n", 0, end)  # past the lines it took
            if value[0] == "'":
                entries[key] = EnvEntry(written, written)
                continue
            written = _ESCAPE.sub(_unescape, written)
        else:  # up to an inline comment (` #`), as Compose cuts it
            written = value.split(" #", 1)[0].rstrip()
        expanded, unresolved = expand(written, lookup)
        entries[key] = EnvEntry(written, expanded, unresolved)
    return entries
