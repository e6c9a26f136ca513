"""Bounds on what a ``response_format`` JSON schema may ask of llama.cpp's grammar code.

A schema becomes a GBNF grammar (llama-cpp-python's converter) that llama.cpp parses with
recursive descent: a ``maxLength``, ``maxItems`` or pattern ``{m,n}`` of N becomes N nested
optional groups, and a deep enough nest overflows the native stack and kills the process
(SIGSEGV) instead of failing. Measured with llama-cpp-python 0.3.36 on this project's
machine (``llama_sampler_init_grammar`` on ``("a" ("a" ...)?)?`` in a thread of a given
stack size): on an 8 MiB stack (Linux's default) the parse crashes between 16,000 and
19,000 nested groups, and the schema repetitions of 20,000-30,000 a client sent crashed
it; on a 512 KiB stack (macOS's default for threads) it crashes between 1,150 and 1,200;
below a crash, llama.cpp itself refuses more than 1,000 nested repetitions ("number of
rules ... exceeds sane defaults"): 1,000 parses, 1,010 is refused. So every count a schema
names is bounded by :data:`MAX_REPETITION` and the grammar's nesting by
:data:`MAX_GRAMMAR_NESTING` (1,000: what llama.cpp accepts, and below the crash on either
stack) before llama.cpp sees it; what is left is refused by llama.cpp's own parser
without harm, and reported.

No llama_cpp here: :func:`check_schema` and :func:`check_grammar` are pure Python; the
backend converts and compiles once these passed.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from edge_vlm.errors import RequestError, RequestTooLargeError

#: Largest repetition count (minLength, maxLength, minItems, maxItems, min/maxProperties,
#: and ``{m,n}`` in a pattern): survives a 512 KiB native stack, llama.cpp's own refusal
#: starts just above.
MAX_REPETITION = 1000
#: Deepest nesting of subschemas.
MAX_SCHEMA_DEPTH = 32
#: Most subschemas in one schema.
MAX_SCHEMA_NODES = 2000
#: Largest schema, as JSON.
MAX_SCHEMA_BYTES = 256 * 1024
#: Most values of one ``enum``.
MAX_ENUM = 1000
#: Longest ``pattern``.
MAX_PATTERN_CHARS = 1000
#: Largest magnitude of ``minimum`` / ``maximum`` and their exclusive forms.
MAX_NUMBER_BOUND = 10**18
#: Largest grammar handed to llama.cpp, in characters.
MAX_GRAMMAR_CHARS = 1024 * 1024
#: Deepest nesting of groups in the grammar (the recursion of llama.cpp's parser).
MAX_GRAMMAR_NESTING = 1000

_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
               "maxProperties", "minContains", "maxContains")
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames",
                  "if", "then", "else", "unevaluatedItems", "unevaluatedProperties",
                  "additionalItems")
_BRACES = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def check_schema(schema: Any, field: str) -> None:
    """Refuse a JSON schema the runtime cannot serve, naming the part of it at fault.

    Args:
        schema: The JSON schema (a dict).
        field: Where it is in the request, e.g. ``response_format.json_schema.schema``.

    Raises:
        RequestTooLargeError: the schema is too large or too deep.
        RequestError: a count, pattern, number or ``$ref`` is out of bounds or unsupported.
    """
    if not isinstance(schema, dict):
        raise RequestError(f"{field}: must be a JSON object", param=field)
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except ValueError:
        raise RequestError(f"{field}: holds NaN or an infinity, which JSON does not have",
                           param=field) from None
    except RecursionError:  # guarded earlier by the request's nesting bound
        raise RequestTooLargeError(f"{field}: nested too deeply", param=field) from None
    if size > MAX_SCHEMA_BYTES:
        raise RequestTooLargeError(
            f"{field}: the schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES}",
            param=field)
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(schema, field, 0)]
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict):
            if isinstance(node, bool):
                continue  # true / false schemas
            raise RequestError(f"{where}: a schema must be an object, got "
                               f"{type(node).__name__}", param=where)
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise RequestTooLargeError(
                f"{field}: the schema has more than {MAX_SCHEMA_NODES} subschemas", param=field)
        if depth > MAX_SCHEMA_DEPTH:
            raise RequestTooLargeError(
                f"{where}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param=where)
        _check_node(node, where, schema)
        for key in _SUBSCHEMA_LISTS:
            value = node.get(key)
            if isinstance(value, list):
                stack.extend((v, f"{where}.{key}[{i}]", depth + 1) for i, v in enumerate(value))
            elif value is not None:
                raise RequestError(f"{where}.{key}: must be a list of schemas", param=where)
        for key in _SUBSCHEMA_MAPS:
            value = node.get(key)
            if isinstance(value, dict):
                stack.extend((v, f"{where}.{key}.{k}", depth + 1) for k, v in value.items())
            elif value is not None:
                raise RequestError(f"{where}.{key}: must be an object of schemas",
                                   param=f"{where}.{key}")
        for key in _SUBSCHEMA_ONE:
            value = node.get(key)
            if isinstance(value, list):  # old-style tuple "items"
                stack.extend((v, f"{where}.{key}[{i}]", depth + 1) for i, v in enumerate(value))
            elif value is not None:
                stack.append((value, f"{where}.{key}", depth + 1))


def _check_node(node: dict[str, Any], where: str, root: dict[str, Any]) -> None:
    for key in _COUNT_KEYS:
        if key not in node:
            continue
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{where}.{key}: must be a whole number, got {value!r}",
                               param=f"{where}.{key}")
        if not 0 <= value <= MAX_REPETITION:
            raise RequestError(
                f"{where}.{key}: {value} is beyond what the runtime can constrain an answer "
                f"to (0 to {MAX_REPETITION})", param=f"{where}.{key}")
    for key in _NUMBER_KEYS:
        if key not in node:
            continue
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{where}.{key}: must be a number, got {value!r}",
                               param=f"{where}.{key}")
        if not math.isfinite(value) or abs(value) > MAX_NUMBER_BOUND:
            raise RequestError(
                f"{where}.{key}: {value!r} is out of range (at most {MAX_NUMBER_BOUND:.0e} "
                "in magnitude)", param=f"{where}.{key}")
    enum = node.get("enum")
    if enum is not None:
        if not isinstance(enum, list) or not enum:
            raise RequestError(f"{where}.enum: must be a non-empty list", param=f"{where}.enum")
        if len(enum) > MAX_ENUM:
            raise RequestTooLargeError(
                f"{where}.enum: {len(enum)} values; at most {MAX_ENUM}", param=f"{where}.enum")
    pattern = node.get("pattern")
    if pattern is not None:
        _check_pattern(pattern, f"{where}.pattern")
    ref = node.get("$ref")
    if ref is not None:
        _check_ref(ref, f"{where}.$ref", root)
    fmt = node.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise RequestError(f"{where}.format: must be a string", param=f"{where}.format")
    kind = node.get("type")
    if kind is not None and not isinstance(kind, (str, list)):
        raise RequestError(f"{where}.type: must be a string or a list of strings",
                           param=f"{where}.type")
    required = node.get("required")
    if required is not None and (not isinstance(required, list)
                                 or not all(isinstance(r, str) for r in required)):
        raise RequestError(f"{where}.required: must be a list of property names",
                           param=f"{where}.required")


def _check_pattern(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise RequestError(f"{where}: must be a string", param=where)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RequestTooLargeError(
            f"{where}: {len(pattern)} characters; at most {MAX_PATTERN_CHARS}", param=where)
    for match in _BRACES.finditer(pattern):
        for number in match.groups():
            if number and int(number) > MAX_REPETITION:
                raise RequestError(
                    f"{where}: the repetition {match.group(0)} is beyond what the runtime can "
                    f"constrain an answer to (counts up to {MAX_REPETITION})", param=where)
    depth = 0
    escaped = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
            if depth > MAX_SCHEMA_DEPTH:
                raise RequestError(
                    f"{where}: groups nest deeper than {MAX_SCHEMA_DEPTH}", param=where)
        elif ch == ")":
            depth -= 1


def _check_ref(ref: Any, where: str, root: dict[str, Any]) -> None:
    if not isinstance(ref, str):
        raise RequestError(f"{where}: must be a string", param=where)
    if not ref.startswith("#/"):
        if "://" in ref or not ref.startswith("#"):
            raise RequestError(
                f"{where}: {ref!r} refers outside the schema; edge-vlm never fetches a schema "
                "(it works offline): put the definition in the schema's $defs and refer to it "
                "as '#/$defs/NAME'", param=where)
        raise RequestError(
            f"{where}: {ref!r} is not supported; refer to a definition as '#/$defs/NAME'",
            param=where)
    target: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(target, dict) or part not in target:
            raise RequestError(f"{where}: {ref!r} points at nothing in the schema", param=where)
        target = target[part]
    if not isinstance(target, (dict, bool)):
        raise RequestError(f"{where}: {ref!r} does not point at a schema", param=where)


def check_grammar(grammar: str, field: str) -> None:
    """Refuse a converted grammar too large or too deeply nested for llama.cpp's parser.

    Raises:
        RequestTooLargeError: naming the limit.
    """
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise RequestTooLargeError(
            f"{field}: the schema makes a grammar of {len(grammar)} characters; at most "
            f"{MAX_GRAMMAR_CHARS}: simplify the schema", param=field)
    nesting = grammar_nesting(grammar)
    if nesting > MAX_GRAMMAR_NESTING:
        raise RequestTooLargeError(
            f"{field}: the schema makes a grammar nested {nesting} levels deep; at most "
            f"{MAX_GRAMMAR_NESTING}: lower its repetition counts", param=field)


def grammar_nesting(grammar: str) -> int:
    """The deepest nesting of ``( )`` groups in a GBNF grammar (outside literals and
    character classes)."""
    depth = best = 0
    i, n = 0, len(grammar)
    while i < n:
        ch = grammar[i]
        if ch in "\"[":
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif ch == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        elif ch == "(":
            depth += 1
            best = max(best, depth)
        elif ch == ")":
            depth -= 1
        i += 1
    return best
