"""JSON another tool wrote, read so that a key written twice in one object is refused.

Python's json (as jq and Go) keeps the last of two values of one key; a shell script reading
the same file with grep or sed finds the first. Such a document says two things at once:
read last-wins, a state file holding `"active_slot": "blue", ..., "active_slot": "green"`
was acted on as green, and the runbook's rewrite kept only that value, the other lost
without a word. Every reader of what another tool writes (the state file, the deploy lock it
records, an app's /health answer) parses with `loads` and refuses such a document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Duplicate:
    """One key written more than once in one object: `path` names it as the state reader
    names keys (`current_deployment.active_slot`, `deployment_history[1].slot`), `values`
    are its values in the order written."""

    key: str
    path: str
    values: tuple[Any, ...]

    @property
    def parent(self) -> str:
        """The path of the object holding the key ("" for the top)."""
        return self.path[:len(self.path) - len(self.key)].removesuffix(".")

    def said(self) -> str:
        """`status is written twice ('unhealthy', then 'healthy')`: each value short, on one
        line, a secret in it masked."""
        shown = [show(v) for v in self.values]
        times = "twice" if len(shown) == 2 else f"{len(shown)} times"
        return (f"{self.path} is written {times} ({', '.join(shown[:-1])}, then {shown[-1]})")


class DuplicateKeyError(ValueError):
    """A document with a key written twice (or more) in one object. `found`: each such key
    the document holds, the first one the parser closed first (an inner object before the
    one holding it); `document`: the document read last-wins, for a reader that needs only
    a part no duplicate touches. A ValueError, so a reader that does not tell it apart
    still refuses the document as not JSON, never reads one of its values."""

    def __init__(self, found: tuple[Duplicate, ...], document: Any) -> None:
        super().__init__(found[0].said())
        self.found = found
        self.document = document


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """json.loads (its keyword arguments too), but DuplicateKeyError for a document in which
    an object holds a key more than once with two different values."""
    found: list[tuple[dict[str, Any], str, tuple[Any, ...]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) < len(items):
            for key in obj:
                values = tuple(v for k, v in items if k == key)
                # the same value twice says one thing, whichever a tool reads: nothing is
                # ambiguous, and a rewrite that keeps one loses nothing
                if len({_canonical(v) for v in values}) > 1:
                    found.append((obj, key, values))
                    break
        return obj

    data = json.loads(text, object_pairs_hook=pairs, **kwargs)
    if not found:
        return data
    # an object that was itself a losing value of a key written twice is not in the
    # document: that key is named (it is found too, in the object holding it)
    paths = _paths_of(data, {id(obj) for obj, _, _ in found})
    raise DuplicateKeyError(tuple(Duplicate(key, _join(paths[id(obj)], key), values)
                                  for obj, key, values in found if id(obj) in paths), data)


def _paths_of(data: Any, wanted: set[int]) -> dict[int, str]:
    """Where each object of `wanted` (by id) sits in `data`, as a key path ("" for the
    top); one the document does not hold is absent. Iterative: a deeply nested document
    must not overflow the stack here."""
    paths: dict[int, str] = {}
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            if id(value) in wanted:
                paths[id(value)] = where
            todo.extend((_join(where, k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
    return paths


def _canonical(value: Any) -> str:
    """A value as one text, so that `true` and `1` (equal in Python) stay two values."""
    return json.dumps(value, sort_keys=True, default=repr)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def show(value: Any, width: int = 40) -> str:
    """A value short, on one line, for an error message: a secret in it masked."""
    from runbook.redact import redact

    try:  # masked before it is cut: a cut secret matches nothing that masks it
        text = redact(repr(value) if isinstance(value, str)
                      else json.dumps(value, default=repr))
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= width else text[:width - 3] + "..."
