"""A JSON schema (a subset) as a Lark grammar, for ``json_schema(schema)`` constraints.

``schema_to_lark(schema, whitespace=False)`` returns Lark source whose sentences are the
JSON texts of the schema's instances, written compactly (no whitespace between tokens,
like ``json.dumps(x, separators=(",", ":"))``; ``whitespace=True`` allows JSON's
whitespace anywhere between tokens). Supported:

* ``{"type": "string"}`` (``minLength``, ``maxLength``), ``"number"``, ``"integer"``,
  ``"boolean"``, ``"null"``; a list of types (any of them);
* ``{"type": "object", "properties": {...}, "required": [...]}``: the listed properties
  only, in the listed order, each optional one may be left out
  (``additionalProperties`` may be false, which is what the grammar does anyway);
* ``{"type": "array", "items": schema}`` (``minItems``, ``maxItems`` up to 64);
* ``enum`` (a list of JSON values) and ``const``; ``anyOf`` / ``oneOf`` of schemas (the union
  of their texts: for ``oneOf`` exact only when the alternatives do not overlap);
* ``{}`` or ``true``: any JSON value; an object without ``properties`` or an array without
  ``items``: any object / array.

Annotations (``title``, ``description``, ``$schema``, ``default``, ``examples``,
``$comment``) are ignored; any other keyword (``pattern``, ``minimum``, ``format``, ``$ref``,
...) is an error naming it, never silently dropped. Numbers follow JSON's syntax
(``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?``), integers are the numbers without a
fraction or an exponent, strings are JSON strings (escapes included, no control
characters).
"""
from __future__ import annotations

import json
from typing import Any

from ...semantics.errors import PPLRuntimeError

_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\(?:["\\\/bfnrt]|u[0-9a-fA-F]{4}))'
_TERMINALS = {
    "STRING": rf'/"{_STRING_CHAR}*"/',
    "NUMBER": r"/-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/",
    "INTEGER": r"/-?(?:0|[1-9][0-9]*)/",
}
_ANNOTATIONS = {"title", "description", "$schema", "default", "examples", "$comment", "$id"}
_KEYWORDS = {
    "type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "additionalProperties",
    "minLength", "maxLength", "minItems", "maxItems",
}
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
MAX_REPEAT = 64


class _Builder:
    """Collects the grammar's rules while walking the schema."""

    def __init__(self):
        self.rules: list[str] = []
        self.n = 0
        self.any_value = False
        self.terminals = dict(_TERMINALS)

    def fresh(self) -> str:
        self.n += 1
        return f"s{self.n}"

    def rule(self, name: str, alternatives: list[str]) -> str:
        self.rules.append(f"{name}: " + "\n    | ".join(a if a else "" for a in alternatives))
        return name


def schema_to_lark(schema: Any, whitespace: bool = False) -> str:
    """Lark source for the JSON texts of ``schema``'s instances (see the module docstring)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise PPLRuntimeError(f"json_schema(): the schema is not valid JSON: {e}",
                                  hint='e.g. json_schema(\'{"type": "object", "properties": {"n": '
                                       '{"type": "integer"}}}\')') from None
    b = _Builder()
    top = _value(b, schema, "schema")
    lines = [f"start: {top}"] + b.rules
    if b.any_value:
        lines += _ANY_JSON
    lines += [f"{name}: {pattern}" for name, pattern in b.terminals.items()]
    if whitespace:
        lines += [r"%ignore /[ \t\n\r]+/"]
    return "\n".join(lines) + "\n"


def _literal(v: Any) -> str:
    """A Lark literal for the compact JSON text of ``v``."""
    return json.dumps(json.dumps(v, separators=(",", ":"), ensure_ascii=False))


def _fail(path: str, msg: str, hint: str | None = None):
    raise PPLRuntimeError(f"json_schema(): {path}: {msg}",
                          hint=hint or "supported: type (string, number, integer, boolean, null, object, "
                                       "array), properties, required, items, enum, const, anyOf, oneOf, "
                                       "minLength/maxLength, minItems/maxItems")


def _count(s: dict, key: str, path: str, default):
    v = s.get(key, default)
    if v is default:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        _fail(path, f"{key} must be a non-negative integer, got {v!r}")
    return v


def _value(b: _Builder, s: Any, path: str) -> str:
    """A Lark expansion for the JSON texts of schema ``s``."""
    if s is True or (isinstance(s, dict) and not (set(s) - _ANNOTATIONS)):
        b.any_value = True
        return "json_value"
    if not isinstance(s, dict):
        _fail(path, f"a schema must be an object (a dict), got {s!r}")
    unknown = sorted(set(s) - _KEYWORDS - _ANNOTATIONS)
    if unknown:
        _fail(path, f"unsupported keyword{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
    if "const" in s:
        return _literal(s["const"])
    if "enum" in s:
        values = s["enum"]
        if not isinstance(values, list) or not values:
            _fail(path, "enum must be a non-empty list of values")
        return "(" + " | ".join(dict.fromkeys(_literal(v) for v in values)) + ")"
    for key in ("anyOf", "oneOf"):
        if key in s:
            alts = s[key]
            if not isinstance(alts, list) or not alts:
                _fail(path, f"{key} must be a non-empty list of schemas")
            return "(" + " | ".join(_value(b, a, f"{path}.{key}[{i}]") for i, a in enumerate(alts)) + ")"
    t = s.get("type")
    if t is None:
        _fail(path, "a schema needs a type (or enum, const, anyOf)")
    types = t if isinstance(t, list) else [t]
    for x in types:
        if x not in _TYPES:
            _fail(path, f"unknown type {x!r}", hint=f"the types are: {', '.join(_TYPES)}")
    alts = [_typed(b, s, x, path) for x in dict.fromkeys(types)]
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def _typed(b: _Builder, s: dict, t: str, path: str) -> str:
    if t == "string":
        lo, hi = _count(s, "minLength", path, 0), _count(s, "maxLength", path, None)
        if lo == 0 and hi is None:
            return "STRING"
        if hi is not None and hi < lo:
            _fail(path, f"maxLength {hi} < minLength {lo}")
        name = f"STRING_{lo}_{'' if hi is None else hi}".upper()
        b.terminals.setdefault(name, rf'/"{_STRING_CHAR}{{{lo},{"" if hi is None else hi}}}"/')
        return name
    if t == "number":
        return "NUMBER"
    if t == "integer":
        return "INTEGER"
    if t == "boolean":
        return '("true" | "false")'
    if t == "null":
        return '"null"'
    if t == "object":
        return _object(b, s, path)
    return _array(b, s, path)


def _object(b: _Builder, s: dict, path: str) -> str:
    props = s.get("properties")
    extra = s.get("additionalProperties", None)
    if extra not in (None, False):
        _fail(path, "additionalProperties other than false is not supported",
              hint="the grammar allows the listed properties only")
    if props is None:
        b.any_value = True
        return "json_object"
    if not isinstance(props, dict):
        _fail(path, "properties must be an object mapping names to schemas")
    required = s.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        _fail(path, "required must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        _fail(path, f"required names {missing} are not among the properties")
    names = list(props)
    members = [f"{_literal(k)} \":\" {_value(b, props[k], f'{path}.properties.{k}')}" for k in names]
    # first[i]: the members from i on, none written yet; after[i]: some already written
    first = [b.fresh() for _ in range(len(names) + 1)]
    after = [b.fresh() for _ in range(len(names) + 1)]
    b.rule(first[-1], [""])
    b.rule(after[-1], [""])
    for i in range(len(names) - 1, -1, -1):
        req = names[i] in required
        b.rule(first[i], [f"{members[i]} {after[i + 1]}"] + ([] if req else [first[i + 1]]))
        b.rule(after[i], [f"\",\" {members[i]} {after[i + 1]}"] + ([] if req else [after[i + 1]]))
    return f"\"{{\" {first[0]} \"}}\""


def _array(b: _Builder, s: dict, path: str) -> str:
    items = s.get("items")
    lo, hi = _count(s, "minItems", path, 0), _count(s, "maxItems", path, None)
    if items is None and lo == 0 and hi is None:
        b.any_value = True
        return "json_array"
    item = _value(b, True if items is None else items, f"{path}.items")
    if hi is not None and hi < lo:
        _fail(path, f"maxItems {hi} < minItems {lo}")
    if max(lo, hi or 0) > MAX_REPEAT:
        _fail(path, f"minItems/maxItems above {MAX_REPEAT} are not supported")
    name = b.fresh()
    if hi == 0:
        return b.rule(name, ['"[" "]"'])
    rest_lo = max(lo - 1, 0)
    if hi is None:
        rest = f'("," {item})' + ("*" if rest_lo == 0 else f" ~ {rest_lo}..{rest_lo} (\",\" {item})*")
    else:
        rest = "" if hi == 1 else f'("," {item}) ~ {rest_lo}..{hi - 1}'
    body = f"{item} {rest}"
    return b.rule(name, [f'"[" {body} "]"'] + (['"[" "]"'] if lo == 0 else []))


_ANY_JSON = [
    'json_value: json_object | json_array | STRING | NUMBER | "true" | "false" | "null"',
    'json_object: "{" [STRING ":" json_value ("," STRING ":" json_value)*] "}"',
    'json_array: "[" [json_value ("," json_value)*] "]"',
]
