"""The parts a job definition is built of, each checked on its own: data refs (inline, blob
key or URL), the build spec, the requirements, sizes, durations and file paths.

:mod:`jupyter_compute_queue.model.jobs` puts them together into the definition and checks what needs
the whole of it (one image or build, no file given twice, secrets not also in env).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .canonical import canonical_json
from .units import parse_duration, parse_size

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class DataRefType(str, Enum):
    """How a DataRef carries its bytes."""

    UTF8 = "utf8"  # value is text, written as UTF-8
    BASE64 = "base64"  # value is base64 of the bytes
    JSON = "json"  # value is any JSON value, written as canonical JSON
    KEY = "key"  # value is the sha256 of a blob stored on the host
    URL = "url"  # value is an http(s) URL the worker fetches


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class DataRef(WireModel):
    """Bytes given inline, by blob key or by URL."""

    type: DataRefType
    value: Any
    hash: str | None = None  # the seed sends it; accepted and ignored

    @model_validator(mode="after")
    def _check_value(self) -> DataRef:
        kind, value = self.type, self.value
        if kind is not DataRefType.JSON and not isinstance(value, str):
            raise ValueError(f"a {kind.value} ref needs a string value")
        if kind is DataRefType.BASE64:
            _b64decode(value)
        elif kind is DataRefType.KEY:
            if not _KEY_RE.fullmatch(value.lower()):
                raise ValueError("a key ref needs the 64 hex digits of a blob's sha256")
            self.value = value.lower()
        elif kind is DataRefType.URL and not re.fullmatch(r"https?://\S+", value, re.IGNORECASE):
            raise ValueError("a url ref needs an http:// or https:// URL")
        elif kind is DataRefType.JSON:
            canonical_json(value)  # refuses NaN and infinities
        return self

    def inline_bytes(self) -> bytes | None:
        """The bytes of an inline ref (utf8, base64, json); None for key and url refs."""
        if self.type is DataRefType.UTF8:
            return str(self.value).encode()
        if self.type is DataRefType.BASE64:
            return _b64decode(self.value)
        if self.type is DataRefType.JSON:
            return canonical_json(self.value)
        return None

    def sha256(self) -> str | None:
        """Hex sha256 of the ref's bytes, known without fetching; None for url refs."""
        if self.type is DataRefType.KEY:
            return str(self.value).lower()
        data = self.inline_bytes()
        return None if data is None else hashlib.sha256(data).hexdigest()

    def canonical(self) -> dict[str, str]:
        """The ref in the canonical form: the same bytes give the same value however sent."""
        digest = self.sha256()
        return {"sha256": digest} if digest is not None else {"url": str(self.value)}


def _b64decode(value: str) -> bytes:
    text = "".join(value.split())  # line breaks and spaces are not part of the data
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode(padded, altchars=b"-_", validate=True)  # url-safe alphabet
        except (binascii.Error, ValueError):
            raise ValueError("a base64 ref needs valid base64 text") from None


def _size(value: object) -> int | None:
    if value is None:
        return None
    size = parse_size(value)
    if size <= 0:
        raise ValueError("must be more than 0 bytes")
    return size


def _duration(value: object) -> int | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0 seconds")
    return seconds


Size = Annotated[int | None, BeforeValidator(_size)]
Duration = Annotated[int | None, BeforeValidator(_duration)]


def _build_args(value: object) -> object:
    """The seed sends build args as a list of ``K=V`` strings; ours is a map."""
    if isinstance(value, list):
        args: dict[str, str] = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"{item!r} is not of the form NAME=value")
            name, _, val = item.partition("=")
            args[name] = val
        return args
    return value


class BuildSpec(WireModel):
    """How to build the job's image instead of pulling one."""

    dockerfile: str | None = None
    context: str | None = None
    build_context: str | None = None
    filename: str | None = None
    target: str | None = None
    build_args: Annotated[dict[str, str], BeforeValidator(_build_args)] = Field(
        default_factory=dict
    )
    platform: str | None = None

    @field_validator("build_context")
    @classmethod
    def _sub_folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        cleaned = value.strip().strip("/")
        while cleaned.startswith("./"):
            cleaned = cleaned[2:]
        if cleaned in ("", "."):
            return None
        check_path(cleaned)
        return cleaned

    @field_validator("context")
    @classmethod
    def _context_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(https?|git)://\S+", value, re.IGNORECASE):
            raise ValueError("the context must be an http(s) or git URL")
        return value

    @model_validator(mode="after")
    def _something_to_build(self) -> BuildSpec:
        if not self.dockerfile and not self.context:
            raise ValueError("a build needs a dockerfile, a context, or both")
        return self


class Requirements(WireModel):
    """What the job needs from a worker."""

    cpus: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    memory: Size = None
    #: Bounded so that any accepted value fits the store's integers (SQLite: 64 bits).
    gpus: int | None = Field(default=None, ge=0, le=1024)
    max_duration: Duration = None  # the seed's spelling; moved to the top level

    @field_validator("cpus", "gpus", mode="before")
    @classmethod
    def _not_bool(cls, value: object) -> object:
        if isinstance(value, bool):  # JSON true would otherwise pass as 1
            raise ValueError("must be a number, not true or false")
        return value


def check_path(path: str, *, absolute_ok: bool = False) -> str:
    """A file path inside the job: no empty, ``.`` or ``..`` segments, no NUL or backslash."""
    if not path:
        raise ValueError("a path cannot be empty")
    if "\x00" in path or "\\" in path:
        raise ValueError(f"{path!r} contains a NUL or a backslash")
    body = path
    if path.startswith("/"):
        if not absolute_ok:
            raise ValueError(f"{path!r} must be relative (it goes under /inputs)")
        body = path[1:]
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"{path!r} has an empty, '.' or '..' segment")
    return path
