"""Job definitions (SPEC §2): the published vectors and command table, validation, and properties.

The test vectors and the command table are read from ``docs/protocol.md``, so the document and
the code cannot drift apart; a few ids are also recomputed here from hand-written canonical JSON
with ``hashlib`` so the tests do not only compare the code with itself.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jupyter_compute_queue.model.argv import command_argv, needs_shell
from jupyter_compute_queue.model.canonical import canonical_json
from jupyter_compute_queue.model.jobs import (
    DEFAULTS,
    InvalidJob,
    canonical_form,
    job_id,
    parse_definition,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
IMAGE = "python:3.12-slim"
HEX64 = re.compile(r"[0-9a-f]{64}")


# --- reading docs/protocol.md ---------------------------------------------------------------


def _section(title: str) -> str:
    """The text under ``### title`` up to the next heading of level 1 to 3."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^### {re.escape(title)}[ \t]*\n(.*?)(?=^#{{1,3}} |\Z)", text, re.M | re.S)
    assert match, f"docs/protocol.md has no section '### {title}'"
    return match.group(1)


def _cells(row: str) -> list[str]:
    """The cells of a markdown table row; ``\\|`` is a pipe inside a cell."""
    inner = row.strip()
    assert inner.startswith("|") and inner.endswith("|"), row
    cells = re.split(r"(?<!\\)\|", inner[1:-1])
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _code(cell: str) -> str:
    """The content of a code span: `x` or `` x `` (the spaces are padding)."""
    match = re.fullmatch(r"(`+)(.*?)\1", cell, re.S)
    assert match, f"not a code span: {cell!r}"
    ticks, body = match.groups()
    return body[1:-1] if len(ticks) > 1 and body.startswith(" ") and body.endswith(" ") else body


def _rows(title: str) -> list[list[str]]:
    """The body rows of the table(s) in a section (header and separator rows skipped)."""
    rows = []
    for line in _section(title).splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows[1:]  # the header


@dataclass(frozen=True)
class Vector:
    number: int
    case: str
    definition: Any
    id: str
    same_as: int | None


def _vectors() -> list[Vector]:
    vectors = []
    for number, case, definition, ident in _rows("Test vectors"):
        same = re.search(r"\(same as (\d+)\)", case)
        vectors.append(
            Vector(
                number=int(number),
                case=case,
                definition=json.loads(_code(definition)),
                id=_code(ident),
                same_as=int(same.group(1)) if same else None,
            )
        )
    return vectors


def _commands() -> list[tuple[Any, list[str] | None, str]]:
    table = []
    for command, argv, why in _rows("Commands"):
        argv_text = _code(argv)
        table.append(
            (
                json.loads(_code(command)),
                None if argv_text == "rejected" else json.loads(argv_text),
                why,
            )
        )
    return table


VECTORS = _vectors()
BY_NUMBER = {v.number: v for v in VECTORS}
COMMANDS = _commands()


# --- the published test vectors -------------------------------------------------------------


def test_the_document_has_about_twenty_vectors_numbered_in_order() -> None:
    assert len(VECTORS) >= 20
    assert [v.number for v in VECTORS] == list(range(1, len(VECTORS) + 1))
    assert all(HEX64.fullmatch(v.id) for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v.number}-{v.case}")
def test_vector(vector: Vector) -> None:
    assert job_id(vector.definition) == vector.id


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v.number}-{v.case}")
def test_vector_id_survives_the_wire_form(vector: Vector) -> None:
    wire = parse_definition(vector.definition).wire()
    assert job_id(json.loads(json.dumps(wire))) == vector.id


def test_vectors_marked_same_share_an_id_and_the_others_differ() -> None:
    groups: dict[int, set[str]] = {}
    for v in VECTORS:
        root = v.number if v.same_as is None else v.same_as
        assert BY_NUMBER[root].same_as is None, f"row {v.number} points at a 'same as' row"
        groups.setdefault(root, set()).add(v.id)
    assert all(len(ids) == 1 for ids in groups.values()), groups
    distinct = [next(iter(ids)) for ids in groups.values()]
    assert len(set(distinct)) == len(distinct)


def test_vectors_cover_what_the_spec_lists() -> None:
    defs = [v.definition for v in VECTORS]
    ref_types = {
        ref["type"]
        for d in defs
        for field in ("inputs", "configFiles")
        for ref in d.get(field, {}).values()
    }
    assert ref_types == {"utf8", "base64", "json", "key", "url"}
    assert any("build" in d for d in defs)
    assert any(isinstance(d.get("command"), list) for d in defs)
    assert any(isinstance(d.get("command"), str) for d in defs)
    assert any(p.startswith("/") for d in defs for p in d.get("configFiles", {}))
    assert any(not json.dumps(d, ensure_ascii=False).isascii() for d in defs)
    assert any("maxDuration" in d.get("requirements", {}) for d in defs)
    assert any(isinstance(d.get("build", {}).get("buildArgs"), list) for d in defs)


# Independent computations: the canonical JSON written by hand, hashed with hashlib.

HELLO_SHA = hashlib.sha256(b"hello\n").hexdigest()
INDEPENDENT = {
    1: b'{"image":"python:3.12-slim","v":1}',
    7: (
        '{"command":"cat /inputs/data/hello.txt","image":"python:3.12-slim",'
        '"inputs":{"data/hello.txt":{"sha256":"' + HELLO_SHA + '"}},"v":1}'
    ).encode(),
    14: b'{"image":"python:3.12-slim","requirements":{"cpus":2,"memory":4294967296},"v":1}',
    17: b'{"image":"python:3.12-slim","maxDuration":3600,"v":1}',
    29: (
        '{"command":"echo \'grüße, 世界\'","env":{"GREETING":"¡hola! 👋"},'
        '"image":"python:3.12-slim","inputs":{"notes/résumé.txt":{"sha256":"'
        + hashlib.sha256("naïve café\n".encode()).hexdigest()
        + '"}},"v":1}'
    ).encode("utf-8"),
    30: (
        b'{"command":"curl -H \\"Authorization: Bearer $API_TOKEN\\" https://example.com",'
        b'"image":"python:3.12-slim","secrets":["API_TOKEN","DB_PASSWORD"],"v":1}'
    ),
}


@pytest.mark.parametrize("number", sorted(INDEPENDENT))
def test_vector_by_an_independent_computation(number: int) -> None:
    expected = hashlib.sha256(INDEPENDENT[number]).hexdigest()
    assert BY_NUMBER[number].id == expected
    assert canonical_json(canonical_form(BY_NUMBER[number].definition)) == INDEPENDENT[number]
    assert job_id(BY_NUMBER[number].definition) == expected


def test_the_worked_example() -> None:
    blocks = re.findall(r"^```\w*\n(.*?)\n```", _section("Canonical form and job id"), re.M | re.S)
    assert len(blocks) == 3, "expected: definition, canonical JSON, id"
    definition, canonical, ident = json.loads(blocks[0]), blocks[1], blocks[2].strip()
    assert canonical_json(canonical_form(definition)) == canonical.encode()
    assert hashlib.sha256(canonical.encode()).hexdigest() == ident == job_id(definition)
    # Its DataRef digests, as the document says, are of the bytes print('hi')\n and 00 01 02.
    refs = json.loads(canonical)["inputs"]
    assert refs["run.py"]["sha256"] == hashlib.sha256(b"print('hi')\n").hexdigest()
    assert refs["data/x.bin"]["sha256"] == hashlib.sha256(bytes([0, 1, 2])).hexdigest()


def test_the_defaults_table_is_fixed() -> None:
    # Changing a default changes ids: this must be a deliberate edit here and in the document.
    assert DEFAULTS == {
        ("shmSize",): 64 * 1024 * 1024,
        ("requirements", "gpus"): 0,
        ("build", "filename"): "Dockerfile",
    }


def test_canonical_json_rules() -> None:
    value = {"b": [1.0, 2.5, None, True], "a": {"é": "世界"}, "A": 0.0}
    assert canonical_json(value) == '{"A":0,"a":{"é":"世界"},"b":[1,2.5,null,true]}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_canonical_form_has_its_own_version_and_no_seed_version() -> None:
    form = canonical_form({"image": IMAGE, "v": 9})
    assert form == {"image": IMAGE, "v": 1}


# --- the command table ----------------------------------------------------------------------


def test_the_command_table_has_about_twenty_rows() -> None:
    assert len(COMMANDS) >= 20
    assert any(isinstance(c, list) for c, _, _ in COMMANDS)
    assert any(argv is None for _, argv, _ in COMMANDS)
    assert any(argv and argv[:2] == ["/bin/sh", "-c"] for _, argv, _ in COMMANDS)


@pytest.mark.parametrize(("command", "argv", "why"), COMMANDS, ids=[w for _, _, w in COMMANDS])
def test_command_table(command: Any, argv: list[str] | None, why: str) -> None:
    for field in ("command", "entrypoint"):
        if argv is None:
            with pytest.raises(ValueError):
                command_argv(command)
            with pytest.raises(InvalidJob) as info:
                parse_definition({"image": IMAGE, field: command})
            assert info.value.field == field
        else:
            assert command_argv(command) == argv
            parse_definition({"image": IMAGE, field: command})  # accepted


SHELL_CHARS = "$`|&;<>()*?[]~\n"


@pytest.mark.parametrize("char", list(SHELL_CHARS))
def test_each_shell_character_outside_single_quotes_means_a_shell(char: str) -> None:
    for text in (f"echo a{char}b", f'echo "a{char}b"', f"echo x'y'{char}"):
        assert needs_shell(text), text
        assert command_argv(text) == ["/bin/sh", "-c", text]
    quoted = f"echo 'a{char}b'"
    assert not needs_shell(quoted)
    assert command_argv(quoted) == ["echo", f"a{char}b"]


def test_quote_characters_that_do_not_open_single_quotes() -> None:
    assert needs_shell('echo "it\'s" $HOME')  # ' inside double quotes
    assert needs_shell("echo it\\'s $HOME")  # an escaped '
    assert not needs_shell("echo 'say \"$HOME\"'")  # " inside single quotes
    assert not needs_shell("echo '\\' 'x'")  # no escapes inside single quotes


def test_no_command_is_the_image_default() -> None:
    assert command_argv(None) is None
    for blank in ("", "  ", "\t", []):
        assert parse_definition({"image": IMAGE, "command": blank}).command is None
        assert job_id({"image": IMAGE, "command": blank}) == job_id({"image": IMAGE})


# --- validation -----------------------------------------------------------------------------


def _utf8(text: str = "x") -> dict[str, str]:
    return {"type": "utf8", "value": text}


UTF8 = {"type": "utf8", "value": "x"}
REJECTED: list[tuple[str, Any, str]] = [
    ("unknown field", {"image": IMAGE, "colour": "red"}, "colour"),
    ("unknown requirement", {"image": IMAGE, "requirements": {"ram": "1g"}}, "requirements.ram"),
    ("unknown build field", {"build": {"dockerfile": "FROM x", "squash": 1}}, "build.squash"),
    (
        "unknown DataRef field",
        {"image": IMAGE, "inputs": {"a.txt": {"type": "utf8", "value": "", "x": 1}}},
        "inputs.a.txt.x",
    ),
    ("neither image nor build", {"command": "ls"}, "image"),
    ("empty definition", {}, "image"),
    ("both image and build", {"image": IMAGE, "build": {"dockerfile": "FROM x"}}, "image"),
    ("empty image", {"image": ""}, "image"),
    ("image with a space", {"image": "python 3"}, "image"),
    ("build with nothing to build", {"build": {"target": "x"}}, "build"),
    ("build context not a URL", {"build": {"context": "file:///etc"}}, "build.context"),
    (
        "build context with a newline",
        {"build": {"context": "https://x.org/c.tgz\n"}},
        "build.context",
    ),
    (
        "buildArgs item without =",
        {"build": {"dockerfile": "FROM x", "buildArgs": ["NOEQUALS"]}},
        "build.buildArgs",
    ),
    (
        "buildContext leaving the context",
        {"build": {"dockerfile": "FROM x", "buildContext": "../up"}},
        "build.buildContext",
    ),
    ("bad size", {"image": IMAGE, "shmSize": "lots"}, "shmSize"),
    ("zero size", {"image": IMAGE, "shmSize": 0}, "shmSize"),
    ("negative size", {"image": IMAGE, "shmSize": -1}, "shmSize"),
    (
        "bad memory",
        {"image": IMAGE, "requirements": {"memory": "4 potatoes"}},
        "requirements.memory",
    ),
    ("huge memory", {"image": IMAGE, "requirements": {"memory": "9" * 400}}, "requirements.memory"),
    (
        "memory over int64",
        {"image": IMAGE, "requirements": {"memory": 2**63}},
        "requirements.memory",
    ),
    ("bad duration", {"image": IMAGE, "maxDuration": "forever"}, "maxDuration"),
    ("zero duration", {"image": IMAGE, "maxDuration": 0}, "maxDuration"),
    ("negative duration", {"image": IMAGE, "maxDuration": "-1h"}, "maxDuration"),
    ("huge duration", {"image": IMAGE, "maxDuration": "9" * 400 + "s"}, "maxDuration"),
    (
        "bad seed duration",
        {"image": IMAGE, "requirements": {"maxDuration": "1y"}},
        "requirements.maxDuration",
    ),
    ("zero cpus", {"image": IMAGE, "requirements": {"cpus": 0}}, "requirements.cpus"),
    ("negative cpus", {"image": IMAGE, "requirements": {"cpus": -0.5}}, "requirements.cpus"),
    ("infinite cpus", {"image": IMAGE, "requirements": {"cpus": "inf"}}, "requirements.cpus"),
    ("NaN cpus", {"image": IMAGE, "requirements": {"cpus": float("nan")}}, "requirements.cpus"),
    ("negative gpus", {"image": IMAGE, "requirements": {"gpus": -1}}, "requirements.gpus"),
    ("fractional gpus", {"image": IMAGE, "requirements": {"gpus": 1.5}}, "requirements.gpus"),
    ("env value a number", {"image": IMAGE, "env": {"A": 1}}, "env.A"),
    ("env value null", {"image": IMAGE, "env": {"A": None}}, "env.A"),
    ("env value a bool", {"image": IMAGE, "env": {"B": True}}, "env.B"),
    ("env name with =", {"image": IMAGE, "env": {"A=B": "x"}}, "env"),
    ("env name empty", {"image": IMAGE, "env": {"": "x"}}, "env"),
    ("env a list", {"image": IMAGE, "env": ["A=1"]}, "env"),
    (
        "input path ..",
        {"image": IMAGE, "inputs": {"../etc/passwd": _utf8()}},
        "inputs.../etc/passwd",
    ),
    ("input path a/../b", {"image": IMAGE, "inputs": {"a/../b": _utf8()}}, "inputs.a/../b"),
    ("input path .", {"image": IMAGE, "inputs": {"a/./b": _utf8()}}, "inputs.a/./b"),
    ("input path NUL", {"image": IMAGE, "inputs": {"a\x00b": _utf8()}}, "inputs.a\x00b"),
    ("input path backslash", {"image": IMAGE, "inputs": {"a\\b": _utf8()}}, "inputs.a\\b"),
    ("input path empty", {"image": IMAGE, "inputs": {"": _utf8()}}, "inputs."),
    ("input path empty segment", {"image": IMAGE, "inputs": {"a//b": _utf8()}}, "inputs.a//b"),
    ("input path trailing /", {"image": IMAGE, "inputs": {"a/": _utf8()}}, "inputs.a/"),
    ("input path absolute", {"image": IMAGE, "inputs": {"/etc/x": _utf8()}}, "inputs./etc/x"),
    (
        "config path with ..",
        {"image": IMAGE, "configFiles": {"/etc/../passwd": _utf8()}},
        "configFiles./etc/../passwd",
    ),
    (
        "config path backslash",
        {"image": IMAGE, "configFiles": {"a\\b": _utf8()}},
        "configFiles.a\\b",
    ),
    ("config path /", {"image": IMAGE, "configFiles": {"/": _utf8()}}, "configFiles./"),
    (
        "file and folder",
        {"image": IMAGE, "inputs": {"a": _utf8(), "a/b": _utf8()}},
        "inputs.a/b",
    ),
    (
        "file and folder, deeper",
        {"image": IMAGE, "inputs": {"a/b/c": _utf8(), "a/b": _utf8()}},
        "inputs.a/b/c",
    ),
    (
        "file in inputs, folder in configFiles",
        {"image": IMAGE, "inputs": {"a": _utf8()}, "configFiles": {"a/b": _utf8()}},
        "configFiles.a/b",
    ),
    (
        "same path in inputs and configFiles",
        {"image": IMAGE, "inputs": {"a": _utf8()}, "configFiles": {"a": _utf8()}},
        "configFiles.a",
    ),
    (
        "bad base64",
        {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": "not base64!"}}},
        "inputs.a",
    ),
    (
        "base64 with a stray character",  # a lenient decoder would drop the "!" and accept
        {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": "aGVs!bG8K"}}},
        "inputs.a",
    ),
    (
        "base64 of no base64 characters",
        {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": "****"}}},
        "inputs.a",
    ),
    (
        "base64 of impossible length",
        {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": "abcde"}}},
        "inputs.a",
    ),
    ("short key", {"image": IMAGE, "inputs": {"a": {"type": "key", "value": "abc"}}}, "inputs.a"),
    (
        "non-hex key",
        {"image": IMAGE, "inputs": {"a": {"type": "key", "value": "g" * 64}}},
        "inputs.a",
    ),
    (
        "key with a trailing newline",
        {"image": IMAGE, "inputs": {"a": {"type": "key", "value": HELLO_SHA + "\n"}}},
        "inputs.a",
    ),
    (
        "ftp url",
        {"image": IMAGE, "inputs": {"a": {"type": "url", "value": "ftp://x.org/a"}}},
        "inputs.a",
    ),
    (
        "file url",
        {"image": IMAGE, "configFiles": {"/a": {"type": "url", "value": "file:///etc/passwd"}}},
        "configFiles./a",
    ),
    (
        "url with a trailing newline",
        {"image": IMAGE, "inputs": {"a": {"type": "url", "value": "https://x.org/a\n"}}},
        "inputs.a",
    ),
    (
        "unknown DataRef type",
        {"image": IMAGE, "inputs": {"a": {"type": "blob", "value": "x"}}},
        "inputs.a.type",
    ),
    (
        "DataRef without value",
        {"image": IMAGE, "inputs": {"a": {"type": "utf8"}}},
        "inputs.a.value",
    ),
    (
        "utf8 value not text",
        {"image": IMAGE, "inputs": {"a": {"type": "utf8", "value": 3}}},
        "inputs.a",
    ),
    (
        "json value with NaN",
        {"image": IMAGE, "inputs": {"a": {"type": "json", "value": [float("nan")]}}},
        "inputs.a",
    ),
    ("unbalanced single quote", {"image": IMAGE, "command": "echo 'oops"}, "command"),
    ("unbalanced double quote", {"image": IMAGE, "command": 'echo "oops'}, "command"),
    ("unbalanced entrypoint", {"image": IMAGE, "entrypoint": "sh -c 'x"}, "entrypoint"),
    ("command list with a number", {"image": IMAGE, "command": ["ls", 3]}, "command"),
    ("command a number", {"image": IMAGE, "command": 3}, "command"),
    ("entrypoint a map", {"image": IMAGE, "entrypoint": {"a": 1}}, "entrypoint"),
    ("empty tag", {"image": IMAGE, "tags": ["gpu", " "]}, "tags"),
    ("tags a string", {"image": IMAGE, "tags": "gpu"}, "tags"),
    ("secret name with a dash", {"image": IMAGE, "secrets": ["API-TOKEN"]}, "secrets"),
    ("secret name starting with a digit", {"image": IMAGE, "secrets": ["1TOKEN"]}, "secrets"),
    ("empty secret name", {"image": IMAGE, "secrets": [""]}, "secrets"),
    ("secret named JOB_*", {"image": IMAGE, "secrets": ["JOB_TOKEN"]}, "secrets"),
    ("secrets a string", {"image": IMAGE, "secrets": "TOKEN"}, "secrets"),
    ("secrets a map of values", {"image": IMAGE, "secrets": {"TOKEN": "x"}}, "secrets"),
    ("a secret that is not a string", {"image": IMAGE, "secrets": [3]}, "secrets.0"),
    (
        "too many secrets",
        {"image": IMAGE, "secrets": [f"S{i}" for i in range(65)]},
        "secrets",
    ),
    ("a name in env and secrets", {"image": IMAGE, "env": {"T": "1"}, "secrets": ["T"]}, "env.T"),
    ("workdir a number", {"image": IMAGE, "workdir": 3}, "workdir"),
    ("not an object", ["image", IMAGE], "definition"),
    ("a string", "python:3.12-slim", "definition"),
    ("cpus true", {"image": IMAGE, "requirements": {"cpus": True}}, "requirements.cpus"),
    ("gpus true", {"image": IMAGE, "requirements": {"gpus": True}}, "requirements.gpus"),
    (
        "absolute config file under another",
        {"image": IMAGE, "configFiles": {"/x": UTF8, "/x/y": UTF8}},
        "configFiles./x/y",
    ),
    (
        "absolute config file inside an input file",
        {"image": IMAGE, "inputs": {"a": UTF8}, "configFiles": {"/inputs/a/b": UTF8}},
        "configFiles./inputs/a/b",
    ),
    # Docker (and exec) cut strings at NUL: refused here rather than failing on a worker.
    ("NUL in the image", {"image": "busybox\x00x"}, "image"),
    ("NUL in a command string", {"image": IMAGE, "command": "echo a\x00b"}, "command"),
    ("NUL in a command argument", {"image": IMAGE, "command": ["echo", "a\x00"]}, "command"),
    ("NUL in an entrypoint", {"image": IMAGE, "entrypoint": ["sh\x00"]}, "entrypoint"),
    ("NUL in an env value", {"image": IMAGE, "env": {"A": "b\x00c"}}, "env"),
    ("NUL in the workdir", {"image": IMAGE, "workdir": "/w\x00"}, "workdir"),
]


@pytest.mark.parametrize(
    ("definition", "field"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_rejected_naming_the_field(definition: Any, field: str) -> None:
    with pytest.raises(InvalidJob) as info:
        parse_definition(definition)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    # job_id validates too: an invalid definition never gets an id.
    with pytest.raises(InvalidJob):
        job_id(definition)


@pytest.mark.parametrize(("definition", "field"), [r[1:] for r in REJECTED[:4]])
def test_an_unknown_field_is_called_unknown(definition: Any, field: str) -> None:
    with pytest.raises(InvalidJob, match=f"^{re.escape(field)}: unknown field$"):
        parse_definition(definition)


ACCEPTED: list[tuple[str, Any]] = [
    ("absolute config file", {"image": IMAGE, "configFiles": {"/etc/app.conf": _utf8()}}),
    ("nested input", {"image": IMAGE, "inputs": {"a/b/c.txt": _utf8(), "a/d.txt": _utf8()}}),
    ("dotfile input", {"image": IMAGE, "inputs": {".env": _utf8(), "a/..b": _utf8()}}),
    ("url-safe base64", {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": "_-8"}}}),
    (
        "wrapped base64",
        {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": "aGVs\nbG8K\n"}}},
    ),
    ("empty base64", {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": ""}}}),
    (
        "upper-case key",
        {"image": IMAGE, "inputs": {"a": {"type": "key", "value": HELLO_SHA.upper()}}},
    ),
    ("json null", {"image": IMAGE, "inputs": {"a": {"type": "json", "value": None}}}),
    ("git context", {"build": {"context": "git://example.org/repo.git"}}),
    ("dockerfile only", {"build": {"dockerfile": "FROM scratch\n"}}),
    ("fractional cpus", {"image": IMAGE, "requirements": {"cpus": 0.25}}),
    ("empty env value", {"image": IMAGE, "env": {"EMPTY": ""}}),
    ("64 secrets", {"image": IMAGE, "secrets": [f"S{i}" for i in range(64)]}),
    ("secret names of any case", {"image": IMAGE, "secrets": ["_a", "hf_token", "X9"]}),
]


@pytest.mark.parametrize("definition", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted(definition: Any) -> None:
    defn = parse_definition(definition)
    assert HEX64.fullmatch(job_id(defn))
    assert job_id(defn.wire()) == job_id(definition)


def test_the_same_bytes_however_base64_is_written() -> None:
    data = bytes([0xFB, 0xEF, 0xFF])  # standard "++//", url-safe "--__"

    def ref(value: str) -> dict[str, Any]:
        return {"image": IMAGE, "inputs": {"a": {"type": "base64", "value": value}}}

    expected = job_id(
        {
            "image": IMAGE,
            "inputs": {"a": {"type": "key", "value": hashlib.sha256(data).hexdigest()}},
        }
    )
    for text in ("++//", "--__", "+\n+//\n", base64.b64encode(data).decode()):
        assert job_id(ref(text)) == expected, text


def test_a_url_ref_stays_the_url_as_given() -> None:
    url = "https://Example.org/Data.CSV?x=1"
    form = canonical_form({"image": IMAGE, "inputs": {"a": {"type": "url", "value": url}}})
    assert form["inputs"] == {"a": {"url": url}}
    other = {"image": IMAGE, "inputs": {"a": {"type": "url", "value": url.lower()}}}
    assert job_id(other) != hashlib.sha256(canonical_json(form)).hexdigest()


def test_a_key_is_stored_in_lower_case() -> None:
    defn = parse_definition(
        {"image": IMAGE, "inputs": {"a": {"type": "key", "value": HELLO_SHA.upper()}}}
    )
    assert defn.wire()["inputs"]["a"] == {"type": "key", "value": HELLO_SHA}
    assert defn.blob_keys() == {HELLO_SHA}


def test_seed_max_duration_the_smaller_wins() -> None:
    both = parse_definition(
        {"image": IMAGE, "maxDuration": "10m", "requirements": {"maxDuration": "1h"}}
    )
    assert both.max_duration == 600
    assert both.requirements is not None and both.requirements.max_duration is None
    assert "requirements" not in both.wire()


def test_wire_keeps_a_json_null_and_inner_empties() -> None:
    value = {"a": None, "b": [], "c": {}}
    definition = {
        "image": IMAGE,
        "inputs": {"n": {"type": "json", "value": None}, "m": {"type": "json", "value": value}},
    }
    wire = parse_definition(definition).wire()
    assert wire["inputs"] == {
        "n": {"type": "json", "value": None},
        "m": {"type": "json", "value": value},
    }
    assert parse_definition(wire).wire() == wire
    assert job_id(wire) == job_id(definition)


# --- properties -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a definition means; ``render`` writes it out in any of the accepted spellings."""

    image: str
    command: tuple[str, ...] | str | None
    env: tuple[tuple[str, str], ...]
    inputs: tuple[tuple[str, bytes], ...]
    memory_mib: int | None
    max_duration_s: int | None
    tags: tuple[str, ...]
    cpus: float | None
    gpus: int


names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
words = st.text(
    st.characters(codec="utf-8", exclude_characters="'\"\\\x00"), min_size=1, max_size=8
)
paths = st.one_of(
    st.from_regex(r"[a-z]{1,6}\.[a-z]{1,3}", fullmatch=True),
    st.from_regex(r"dir/[a-z]{1,6}\.[a-z]{1,3}", fullmatch=True),
)
jobs = st.builds(
    Job,
    image=st.builds(lambda n, t: f"{n}:{t}", names, names),
    command=st.one_of(
        st.none(),
        st.lists(words, min_size=1, max_size=4).map(tuple),
        st.lists(names, min_size=1, max_size=4).map(" ".join),
    ),
    env=st.dictionaries(
        st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True),
        # NUL and lone surrogates are refused (test_lone_surrogates_are_refused_naming_where)
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
        max_size=3,
    ).map(lambda d: tuple(sorted(d.items()))),
    inputs=st.dictionaries(paths, st.binary(max_size=16), max_size=3).map(
        lambda d: tuple(sorted(d.items()))
    ),
    memory_mib=st.none() | st.integers(1, 1 << 20),
    max_duration_s=st.none() | st.integers(1, 10**6),
    tags=st.lists(names, max_size=3, unique=True).map(lambda t: tuple(sorted(t))),
    cpus=st.none() | st.sampled_from([0.5, 1.0, 1.5, 2.0, 8.0]),
    gpus=st.integers(0, 4),
)


def _ref(data: bytes, draw: Any) -> dict[str, str]:
    kinds = ["base64", "key"]
    try:
        data.decode("utf-8")
        kinds.append("utf8")
    except UnicodeDecodeError:
        pass
    kind = draw(st.sampled_from(kinds))
    if kind == "utf8":
        return {"type": "utf8", "value": data.decode("utf-8")}
    if kind == "key":
        digest = hashlib.sha256(data).hexdigest()
        return {"type": "key", "value": draw(st.sampled_from([digest, digest.upper()]))}
    text = draw(st.sampled_from([base64.b64encode(data), base64.urlsafe_b64encode(data)])).decode()
    return {"type": "base64", "value": draw(st.sampled_from([text, text.rstrip("=")]))}


def _size(mib: int, draw: Any) -> object:
    spellings: list[object] = [
        f"{mib}m",
        f"{mib}M",
        f"{mib}MiB",
        f"{mib}mb",
        f"{mib * 1024}k",
        mib << 20,
        str(mib << 20),
    ]
    if mib % 1024 == 0:
        spellings += [f"{mib // 1024}g", f"{mib // 1024}GB"]
    return draw(st.sampled_from(spellings))


def _duration(seconds: int, draw: Any) -> object:
    spellings: list[object] = [seconds, str(seconds), f"{seconds}s", float(seconds)]
    if seconds % 60 == 0:
        spellings.append(f"{seconds // 60}m")
    if seconds % 3600 == 0:
        spellings.append(f"{seconds // 3600}h")
    if seconds >= 3600 and seconds % 60 == 0:
        spellings.append(f"{seconds // 3600}h{seconds % 3600 // 60}m")
    return draw(st.sampled_from(spellings))


def _shuffled(value: Any, rnd: random.Random) -> Any:
    """The same JSON value with every object's keys in another order."""
    if isinstance(value, dict):
        items = [(k, _shuffled(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


def render(job: Job, draw: Any, *, defaults: bool = False) -> dict[str, Any]:
    """A definition of ``job``, spelled with random choices (``draw`` is ``data.draw``)."""
    d: dict[str, Any] = {"image": job.image}
    if job.command is not None:
        d["command"] = list(job.command) if isinstance(job.command, tuple) else job.command
    if job.env:
        d["env"] = dict(job.env)
    if job.inputs:
        d["inputs"] = {path: _ref(data, draw) for path, data in job.inputs}
    requirements: dict[str, Any] = {}
    if job.memory_mib is not None:
        requirements["memory"] = _size(job.memory_mib, draw)
    if job.cpus is not None:
        requirements["cpus"] = (
            draw(st.sampled_from([job.cpus, int(job.cpus)])) if job.cpus.is_integer() else job.cpus
        )
    if job.gpus:
        requirements["gpus"] = job.gpus
    if job.max_duration_s is not None:
        where = draw(st.sampled_from(["top", "seed", "both"]))
        if where in ("top", "both"):
            d["maxDuration"] = _duration(job.max_duration_s, draw)
        if where in ("seed", "both"):
            requirements["maxDuration"] = _duration(job.max_duration_s, draw)
        if where == "both" and draw(st.booleans()):  # a larger limit beside it loses
            d["maxDuration"] = job.max_duration_s + draw(st.integers(1, 1000))
    if job.tags:
        extra = draw(st.lists(st.sampled_from(job.tags), max_size=3))
        d["tags"] = draw(st.permutations([*job.tags, *extra]))
    if requirements:
        d["requirements"] = requirements
    if defaults:
        d.setdefault("shmSize", draw(st.sampled_from(["64m", "65536k", 67108864, "64MiB"])))
        d.setdefault("requirements", {}).setdefault("gpus", 0)
        for field, empty in (
            ("env", {}),
            ("inputs", {}),
            ("configFiles", {}),
            ("tags", []),
            ("workdir", None),
        ):
            d.setdefault(field, empty)
        d.setdefault("command", draw(st.sampled_from([None, "", [], "  "])))
        d.setdefault("entrypoint", None)
        d["v"] = draw(st.integers(0, 100))
    return d


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(job=jobs, data=st.data())
def test_key_order_does_not_change_the_id(job: Job, data: st.DataObject) -> None:
    definition = render(job, data.draw)
    shuffled = _shuffled(definition, random.Random(data.draw(st.integers())))
    assert job_id(shuffled) == job_id(definition)


@PROPERTY
@given(job=jobs, data=st.data())
def test_defaults_spelled_out_do_not_change_the_id(job: Job, data: st.DataObject) -> None:
    plain = render(job, data.draw)
    assert job_id(render(job, data.draw, defaults=True)) == job_id(plain)


@PROPERTY
@given(job=jobs, data=st.data())
def test_any_two_spellings_of_a_job_have_one_id(job: Job, data: st.DataObject) -> None:
    first = render(job, data.draw, defaults=data.draw(st.booleans()))
    second = render(job, data.draw, defaults=data.draw(st.booleans()))
    assert job_id(first) == job_id(second)


@PROPERTY
@given(payload=st.binary(max_size=64), path=paths, data=st.data())
def test_equal_bytes_as_utf8_base64_or_key_give_one_id(
    payload: bytes, path: str, data: st.DataObject
) -> None:
    def defn(ref: dict[str, str]) -> dict[str, Any]:
        return {"image": IMAGE, "inputs": {path: ref}}

    ids = {
        job_id(defn({"type": "base64", "value": base64.b64encode(payload).decode()})),
        job_id(defn({"type": "key", "value": hashlib.sha256(payload).hexdigest()})),
        job_id(defn(_ref(payload, data.draw))),
    }
    with contextlib.suppress(UnicodeDecodeError):
        ids.add(job_id(defn({"type": "utf8", "value": payload.decode("utf-8")})))
    assert len(ids) == 1
    digest = hashlib.sha256(payload).hexdigest()
    assert canonical_form(defn(_ref(payload, data.draw)))["inputs"] == {path: {"sha256": digest}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@PROPERTY
@given(value=json_values)
def test_a_json_ref_is_its_canonical_text(value: Any) -> None:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    as_json = {"image": IMAGE, "inputs": {"v.json": {"type": "json", "value": value}}}
    as_text = {"image": IMAGE, "inputs": {"v.json": {"type": "utf8", "value": text}}}
    assert job_id(as_json) == job_id(as_text)
    wire = parse_definition(as_json).wire()
    assert wire["inputs"]["v.json"] == {"type": "json", "value": value}


@PROPERTY
@given(gib=st.integers(1, 1 << 12))
def test_4g_is_4096m_is_4294967296(gib: int) -> None:
    spellings = [
        f"{gib}g",
        f"{gib * 1024}m",
        gib << 30,
        str(gib << 30),
        f"{gib}GiB",
        f"{gib * 1024 * 1024}k",
    ]
    memory = {job_id({"image": IMAGE, "requirements": {"memory": s}}) for s in spellings}
    shm = {job_id({"image": IMAGE, "shmSize": s}) for s in spellings}
    assert len(memory) == len(shm) == 1
    assert memory != shm
    assert canonical_form({"image": IMAGE, "requirements": {"memory": f"{gib}g"}})[
        "requirements"
    ] == {"memory": gib << 30}


@PROPERTY
@given(hours=st.integers(1, 1000))
def test_1h_is_3600_is_60m(hours: int) -> None:
    seconds = hours * 3600
    spellings: list[object] = [
        f"{hours}h",
        seconds,
        str(seconds),
        f"{hours * 60}m",
        f"{seconds}s",
        f"{hours - 1}h60m",
    ]
    ids = {job_id({"image": IMAGE, "maxDuration": s}) for s in spellings}
    ids |= {job_id({"image": IMAGE, "requirements": {"maxDuration": s}}) for s in spellings}
    assert len(ids) == 1
    assert canonical_form({"image": IMAGE, "maxDuration": f"{hours}h"})["maxDuration"] == seconds


@PROPERTY
@given(
    tags=st.lists(st.text(min_size=1, max_size=5).filter(str.strip), min_size=1, max_size=5),
    data=st.data(),
)
def test_tag_order_and_duplicates_do_not_change_the_id(
    tags: list[str], data: st.DataObject
) -> None:
    other = data.draw(
        st.permutations(tags + data.draw(st.lists(st.sampled_from(tags), max_size=4)))
    )
    assert job_id({"image": IMAGE, "tags": other}) == job_id({"image": IMAGE, "tags": tags})
    assert canonical_form({"image": IMAGE, "tags": other})["tags"] == sorted(set(tags))


def _changed(job: Job, what: str, draw: Any) -> Job:
    """``job`` with one meaningful difference."""
    if what == "image":
        return replace(job, image=job.image + "x")
    if what == "command":
        if isinstance(job.command, tuple):
            return replace(job, command=(*job.command, "x"))
        return replace(job, command=(job.command or "") + " x")
    if what == "env":
        if not job.env:
            return replace(job, env=(("X", ""),))
        (name, value), *rest = job.env
        return replace(job, env=((name, value + "x"), *rest))
    if what == "input":
        if not job.inputs:
            return replace(job, inputs=(("new.txt", b""),))
        (path, data), *rest = job.inputs
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        else:
            data = b"\x00"
        return replace(job, inputs=((path, data), *rest))
    if what == "input path":
        if not job.inputs:
            return replace(job, inputs=(("new.txt", b""),))
        (path, data), *rest = job.inputs
        return replace(job, inputs=(("other/" + path, data), *rest))
    if what == "memory":
        return replace(job, memory_mib=(job.memory_mib or 0) + 1)
    if what == "maxDuration":
        return replace(job, max_duration_s=(job.max_duration_s or 0) + 1)
    if what == "gpus":
        return replace(job, gpus=job.gpus + 1)
    if what == "cpus":
        return replace(job, cpus=(job.cpus or 0) + 0.25)
    assert what == "tag"
    return replace(job, tags=tuple(sorted({*job.tags, "zz-new"})))


CHANGES = [
    "image",
    "command",
    "env",
    "input",
    "input path",
    "memory",
    "maxDuration",
    "gpus",
    "cpus",
    "tag",
]


@PROPERTY
@given(job=jobs, what=st.sampled_from(CHANGES), data=st.data())
def test_a_meaningful_change_changes_the_id(job: Job, what: str, data: st.DataObject) -> None:
    other = _changed(job, what, data.draw)
    assume(other != job)
    assert job_id(render(other, data.draw)) != job_id(render(job, data.draw))


@PROPERTY
@given(job=jobs, data=st.data())
def test_wire_round_trips(job: Job, data: st.DataObject) -> None:
    definition = render(job, data.draw, defaults=data.draw(st.booleans()))
    wire = parse_definition(definition).wire()
    again = parse_definition(json.loads(json.dumps(wire)))
    assert again.wire() == wire
    assert job_id(again) == job_id(definition)
    assert "v" not in wire  # the seed's counter is not kept


@PROPERTY
@given(job=jobs, data=st.data())
def test_canonical_form_is_canonical_json_of_itself(job: Job, data: st.DataObject) -> None:
    definition = render(job, data.draw)
    form = canonical_form(definition)
    text = canonical_json(form)
    assert json.loads(text) == form
    assert (
        text == json.dumps(form, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert job_id(definition) == hashlib.sha256(text).hexdigest()
    assert form["v"] == 1


def test_definitions_are_not_mutated() -> None:
    definition = {
        "image": IMAGE,
        "tags": ["b", "a", "b"],
        "requirements": {"maxDuration": "1h", "gpus": 0},
    }
    before = copy.deepcopy(definition)
    job_id(definition)
    parse_definition(definition).wire()
    assert definition == before


# --- secrets: names in the definition and the id, values never --------------------------------


def test_secrets_are_sorted_and_deduplicated_in_the_stored_form() -> None:
    defn = parse_definition({"image": IMAGE, "secrets": ["B", "A", "B"]})
    assert defn.secrets == ["A", "B"]
    assert defn.wire()["secrets"] == ["A", "B"]
    assert canonical_form(defn)["secrets"] == ["A", "B"]


def test_no_secrets_keeps_the_id() -> None:
    bare = job_id({"image": IMAGE})
    assert job_id({"image": IMAGE, "secrets": []}) == bare
    assert "secrets" not in parse_definition({"image": IMAGE, "secrets": []}).wire()


def test_secret_names_are_part_of_the_id() -> None:
    one = job_id({"image": IMAGE, "secrets": ["TOKEN"]})
    assert one != job_id({"image": IMAGE})
    assert one != job_id({"image": IMAGE, "secrets": ["OTHER"]})
    assert one != job_id({"image": IMAGE, "env": {"TOKEN": ""}})


@PROPERTY
@given(
    names=st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), max_size=6),
    data=st.data(),
)
def test_secret_order_and_duplicates_do_not_change_the_id(
    names: list[str], data: st.DataObject
) -> None:
    names = [n for n in names if not n.startswith("JOB_")]
    other = data.draw(
        st.permutations(names + data.draw(st.lists(st.sampled_from(names), max_size=3)))
        if names
        else st.just([])
    )
    assert job_id({"image": IMAGE, "secrets": other}) == job_id({"image": IMAGE, "secrets": names})


@pytest.mark.parametrize(
    ("definition", "field"),
    [
        ({"image": "x", "env": {"A": "a\ud800"}}, "env.A"),
        ({"image": "x", "env": {"\udc00": "v"}}, "env"),
        ({"image": "x", "command": ["echo", "\udbff"]}, "command[1]"),
        ({"image": "x", "inputs": {"a": {"type": "utf8", "value": "\ud800"}}}, "inputs.a.value"),
    ],
)
def test_lone_surrogates_are_refused_naming_where(definition: dict[str, Any], field: str) -> None:
    """A lone UTF-16 surrogate (json reads ``"\\ud800"`` into one) is no text: no id could be
    taken of it. A surrogate pair is a character like any other."""
    with pytest.raises(InvalidJob, match="lone UTF-16 surrogate") as refused:
        parse_definition(definition)
    assert refused.value.field == field
    fine = parse_definition({"image": "x", "env": {"A": json.loads('"\\ud83d\\ude00"')}})
    assert job_id(fine) == job_id({"image": "x", "env": {"A": "\U0001f600"}})
