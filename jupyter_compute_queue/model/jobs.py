"""Job definitions: the definition as a whole, its validation, its canonical form and job id.

A job is its definition; its id is the SHA-256 of the canonical form (SPEC §2). This module is
the only place that computes ids: clients import it, the host ignores ids that clients send.
The definition's parts (data refs, build spec, requirements, paths) are in
:mod:`~jupyter_compute_queue.model.job_fields`, the command's argv in
:mod:`~jupyter_compute_queue.model.argv` and the JSON bytes that are hashed in
:mod:`~jupyter_compute_queue.model.canonical`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from .argv import Command, command_argv
from .canonical import canonical_json, integral_numbers, lone_surrogate, surrogate_message
from .job_fields import (
    BuildSpec,
    DataRef,
    DataRefType,
    Duration,
    Requirements,
    Size,
    WireModel,
    check_path,
)

# The module's public names, and the parts the worker and the websockets still import from here.
__all__ = [
    "CANONICAL_VERSION",
    "DEFAULTS",
    "MAX_SECRETS",
    "SECRET_NAME_RE",
    "BuildSpec",
    "DataRefType",
    "InvalidJob",
    "JobDefinition",
    "canonical_form",
    "canonical_json",
    "check_path",
    "command_argv",
    "job_id",
    "parse_definition",
]

#: The canonical form's own version, written as ``"v"`` into every canonical form.
CANONICAL_VERSION = 1

#: Values equal to these are removed from the canonical form, so spelling a default out gives
#: the same id. Changing this table changes ids: do it only deliberately.
DEFAULTS: dict[tuple[str, ...], object] = {
    ("shmSize",): 64 * 1024 * 1024,  # Docker's own default /dev/shm size
    ("requirements", "gpus"): 0,
    ("build", "filename"): "Dockerfile",
}

_ENV_NAME_RE = re.compile(r"^[^=\x00]+$")
#: A secret's name is a portable environment variable name (POSIX's portable character set).
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: At most this many secrets per job.
MAX_SECRETS = 64


class InvalidJob(ValueError):
    """A definition that cannot be accepted; ``field`` names the offending field (wire spelling)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class JobDefinition(WireModel):
    """A job: everything needed to run it (SPEC §2), normalised as it is stored.

    Sizes are bytes and durations seconds; ``requirements.maxDuration`` and list ``buildArgs``
    (the seed's spellings) are moved to ours when parsed.
    """

    image: str | None = None
    build: BuildSpec | None = None
    command: Command = None
    entrypoint: Command = None
    env: dict[str, str] = Field(default_factory=dict)
    #: Names of environment variables whose values come with the submission or from the
    #: worker, never in the definition (docs/design.md, "Secrets"); the names are in the id.
    secrets: list[str] = Field(default_factory=list)
    workdir: str | None = None
    shm_size: Size = None
    inputs: dict[str, DataRef] = Field(default_factory=dict)
    config_files: dict[str, DataRef] = Field(default_factory=dict)
    requirements: Requirements | None = None
    max_duration: Duration = None
    tags: list[str] = Field(default_factory=list)
    v: int | None = None  # the seed's version counter; accepted and ignored

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError("an image reference cannot be empty or contain spaces")
        return _no_nul(value)

    @field_validator("command", "entrypoint")
    @classmethod
    def _command(cls, value: Command) -> Command:
        if value == [] or (isinstance(value, str) and not value.strip()):
            return None
        for part in [value] if isinstance(value, str) else value or []:
            _no_nul(part)
        command_argv(value)  # refuses unbalanced quotes now rather than on the worker
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        return _no_nul(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid variable name")
            if "\x00" in text:
                raise ValueError(f"the value of {name!r} contains a NUL character")
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            if not SECRET_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a variable name (letters, digits, _)")
            if name.startswith("JOB_"):
                raise ValueError(f"{name!r}: JOB_* variables are set by the worker")
        names = sorted(set(value))
        if len(names) > MAX_SECRETS:
            raise ValueError(f"at most {MAX_SECRETS} secrets, not {len(names)}")
        return names

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: dict[str, DataRef]) -> dict[str, DataRef]:
        return _check_paths("inputs", value, absolute_ok=False)

    @field_validator("config_files")
    @classmethod
    def _config_files(cls, value: dict[str, DataRef]) -> dict[str, DataRef]:
        return _check_paths("configFiles", value, absolute_ok=True)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        if any(not tag.strip() for tag in value):
            raise ValueError("tags cannot be empty")
        return sorted(set(value))

    @model_validator(mode="after")
    def _normalise(self) -> JobDefinition:
        if (self.image is None) == (self.build is None):
            raise InvalidJob("image", "give exactly one of 'image' and 'build'")
        _check_input_tree(self)
        both = sorted(set(self.secrets) & set(self.env))
        if both:
            raise InvalidJob(f"env.{both[0]}", "also listed in secrets: give it in one place")
        req = self.requirements
        if req is not None and req.max_duration is not None:
            # The seed's spelling: the smaller limit wins when both are given.
            limits = [d for d in (self.max_duration, req.max_duration) if d is not None]
            self.max_duration = min(limits)
            req.max_duration = None
        return self

    def wire(self) -> dict[str, Any]:
        """The stored and served form: camelCase, normalised, nothing empty, no seed ``v``."""
        # No exclude_none: _prune drops the nulls, but keeps a json ref's null value.
        form = self.model_dump(mode="json", by_alias=True, exclude={"v"})
        return _prune(form)  # type: ignore[no-any-return]

    def data_refs(self) -> Iterator[tuple[str, str, DataRef]]:
        """Every DataRef as (field, path, ref), field being ``inputs`` or ``configFiles``."""
        for path, ref in self.inputs.items():
            yield "inputs", path, ref
        for path, ref in self.config_files.items():
            yield "configFiles", path, ref

    def blob_keys(self) -> set[str]:
        """The blob keys this definition refers to (``key`` refs)."""
        return {
            str(ref.value).lower() for _, _, ref in self.data_refs() if ref.type is DataRefType.KEY
        }

    @property
    def cpus(self) -> float | None:
        return self.requirements.cpus if self.requirements else None

    @property
    def memory(self) -> int | None:
        return self.requirements.memory if self.requirements else None

    @property
    def gpus(self) -> int:
        return (self.requirements.gpus or 0) if self.requirements else 0


def _no_nul(value: str | None) -> str | None:
    """Docker (and every exec) ends a string at NUL: refuse it here, not fail on a worker."""
    if value is not None and "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


def _check_paths(field: str, refs: dict[str, DataRef], *, absolute_ok: bool) -> dict[str, DataRef]:
    for path in refs:
        try:
            check_path(path, absolute_ok=absolute_ok)
        except ValueError as exc:
            raise InvalidJob(f"{field}.{path}", str(exc)) from None
    return refs


def _check_input_tree(defn: JobDefinition) -> None:
    """No file may be given twice or also be a folder, whether under /inputs or absolute."""
    files: dict[str, tuple[str, str]] = {}  # path in the container → (field, path as given)
    for field, path, _ in defn.data_refs():
        # Relative paths share /inputs; absolute config files are mounted where they say.
        where = path if path.startswith("/") else f"/inputs/{path}"
        if where in files:
            raise InvalidJob(f"{field}.{path}", f"{path!r} is also given in {files[where][0]}")
        files[where] = (field, path)
    for where, (field, path) in files.items():
        parts = where.split("/")
        for i in range(2, len(parts)):
            folder = files.get("/".join(parts[:i]))
            if folder is not None:
                raise InvalidJob(
                    f"{field}.{path}", f"{folder[1]!r} is a file, so it cannot also be a folder"
                )


def _prune(value: Any) -> Any:
    """Drop nulls and empty maps and lists, recursively (but never inside a json DataRef)."""
    if isinstance(value, dict):
        if value.get("type") == "json" and "value" in value:
            return {k: v for k, v in value.items() if v is not None or k == "value"}
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def parse_definition(obj: Any) -> JobDefinition:
    """Validate a definition (ours or the seed's) and normalise it.

    Raises :class:`InvalidJob` whose message starts with the bad field, e.g.
    ``requirements.memory: '4 potatoes' is not a size``.
    """
    if isinstance(obj, JobDefinition):
        return obj
    if not isinstance(obj, Mapping):
        raise InvalidJob("definition", "a job definition must be a JSON object")
    _refuse_lone_surrogates(obj)
    try:
        return JobDefinition.model_validate(dict(obj))
    except InvalidJob:
        raise
    except ValidationError as exc:
        raise _invalid(exc) from None


def _refuse_lone_surrogates(obj: Mapping[str, Any]) -> None:
    """No id, store or container takes a string with a lone UTF-16 surrogate: InvalidJob
    naming where it is."""
    found = lone_surrogate(obj)
    if found is not None:
        raise InvalidJob(found[0] or "definition", surrogate_message(found[1]))


def _invalid(exc: ValidationError) -> InvalidJob:
    error = exc.errors(include_url=False)[0]
    loc = list(error["loc"])
    if len(loc) > 1 and loc[0] in ("command", "entrypoint"):
        del loc[1]  # pydantic's name of the union member ('str', 'list[str]'), not a field
    field = ".".join(str(part) for part in loc)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, InvalidJob):
        return cause
    return InvalidJob(field, message)


def canonical_form(
    defn: JobDefinition | Mapping[str, Any], wire: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The form whose hash is the job id (SPEC §2). ``wire``: the definition's ``wire()``, when
    the caller has it already (it is changed in place)."""
    parsed = parse_definition(defn)
    form = parsed.wire() if wire is None else wire
    for path, default in DEFAULTS.items():
        *parents, leaf = path
        node: Any = form
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == default:
            del node[leaf]
    for field in ("inputs", "configFiles"):
        refs = getattr(parsed, "inputs" if field == "inputs" else "config_files")
        if refs:
            form[field] = {path: ref.canonical() for path, ref in refs.items()}
    form = _prune(integral_numbers(form))
    form["v"] = CANONICAL_VERSION
    return form  # type: ignore[no-any-return]


def job_id(defn: JobDefinition | Mapping[str, Any], wire: dict[str, Any] | None = None) -> str:
    """Lowercase hex SHA-256 of the canonical form (``wire`` as for :func:`canonical_form`)."""
    return hashlib.sha256(canonical_json(canonical_form(defn, wire))).hexdigest()
