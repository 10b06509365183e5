"""Task requests: what a producer asks for (Apple's BGTaskRequest family).

A request is plain data with a kind, an identifier, a not-before date, requirement
flags and a JSON payload. `record`/`from_record` are the only place that knows
how a request is laid out in Redis, so the Lua scripts and Python agree on one shape.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any, ClassVar

from bgqueue.errors import ParameterError

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_NAME_LENGTH = 200


class FileProtectionType(StrEnum):
    """Data a worker must be able to open, weakest first (Apple's NSFileProtectionType)."""

    NONE = "none"
    COMPLETE_UNTIL_FIRST_USER_AUTHENTICATION = "complete_until_first_user_authentication"
    COMPLETE_UNLESS_OPEN = "complete_unless_open"
    COMPLETE = "complete"

    @property
    def level(self) -> int:
        """Rank in the ordering: a worker that opens level n opens every level below."""
        return list(FileProtectionType).index(self)


class ContinuedProcessingStrategy(StrEnum):
    """What a continued-processing request does when it cannot start now."""

    FAIL = "fail"
    QUEUE = "queue"


class Kind(StrEnum):
    """Task kinds; each has its own time budget."""

    REFRESH = "refresh"
    PROCESSING = "processing"
    HEALTH_RESEARCH = "health_research"
    CONTINUED_PROCESSING = "continued_processing"


# The start of a pending record of each kind, up to its profile (BGTaskRequest.record).
_RECORD_HEADS = {kind: f'{{"k":"{kind.value}","s":"pending","r":' for kind in Kind}


class State(StrEnum):
    """Life of a request: pending → dispatched → running → one of the ends."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Requirement(IntEnum):
    """Bits of a requirement profile; see `profile`."""

    NETWORK = 1
    EXTERNAL_POWER = 2


PROFILE_COUNT = 16  # network × power × four protection levels
# As plain ints: an IntEnum member costs an attribute lookup and a conversion per request.
_NETWORK, _EXTERNAL_POWER = int(Requirement.NETWORK), int(Requirement.EXTERNAL_POWER)


def requirement_names(profile: int) -> list[str]:
    """A profile as the names of what it requires, e.g. ['network',
    'data_protection:complete'] (what Flower shows of a run's message)."""
    names = []
    if profile & Requirement.NETWORK:
        names.append("network")
    if profile & Requirement.EXTERNAL_POWER:
        names.append("external_power")
    if profile >> 2:
        names.append(f"data_protection:{list(FileProtectionType)[profile >> 2]}")
    return names


@functools.cache
def _requirement_bits() -> dict[str, int]:
    bits: dict[str, int] = {
        "network": Requirement.NETWORK,
        "external_power": Requirement.EXTERNAL_POWER,
    }
    bits.update({f"data_protection:{t}": t.level << 2 for t in FileProtectionType if t.level})
    return bits


def profile_of(names: object) -> int:
    """The profile `requirement_names` named; ValueError for anything else (every run's
    message is read through it)."""
    bits = _requirement_bits()
    if not isinstance(names, list) or not all(name in bits for name in names):
        raise ValueError(f"not a list of requirement names: {names!r}")
    profile = 0
    for name in names:
        profile |= bits[name]
    if requirement_names(profile) != names:
        raise ValueError(f"not a requirement list bgqueue writes: {names!r}")
    return profile


def check_name(value: object, what: str) -> str:
    """A printable identifier or scope name, or ParameterError saying what is wrong."""
    if not isinstance(value, str):
        raise ParameterError(f"{what} must be a string, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_NAME_LENGTH:
        raise ParameterError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters, got {len(value)}")
    # Reserved: names starting with '#' are bookkeeping fields in the scope's hash.
    # isprintable() is False for every whitespace character but the ASCII space.
    if value.startswith("#") or not value.isprintable() or " " in value:
        raise ParameterError(f"{what} {value!r} must be printable, without spaces or a leading '#'")
    return value


def encode_payload(payload: Any) -> str:
    """The payload as compact JSON text; anything JSON cannot carry is a ParameterError."""
    if payload is None:
        return "null"
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"payload must be JSON-serialisable: {exc}") from None
    size = len(text.encode())
    if size > MAX_PAYLOAD_BYTES:
        raise ParameterError(f"payload is {size} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES}")
    # json.dumps quietly turns tuples into lists and int keys into strings; the handler
    # must receive exactly what was submitted.
    if json.loads(text) != payload:
        raise ParameterError("payload must be plain JSON: string keys, lists (not tuples)")
    return text


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    return math.ceil(moment.timestamp() * 1000)


def from_ms(ms: int | float | None) -> datetime | None:
    """An aware UTC datetime from epoch milliseconds (None stays None)."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(f"{what} must be True or False, got {value!r}")
    return value


@dataclass
class BGTaskRequest:
    """Base of every request: identifier, not-before date, requirement flags, payload.

    `earliest_begin_date=None` means "as soon as a capable worker is free".
    """

    identifier: str
    earliest_begin_date: datetime | None = None
    requires_network_connectivity: bool = False
    requires_external_power: bool = False
    payload: Any = None

    kind: ClassVar[Kind] = Kind.PROCESSING

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ParameterError for anything a submit would refuse (requests are mutable)."""
        self.record()

    def record(self) -> tuple[str, int, int]:
        """Validate, then the Redis record of this request while it waits (lua/submit.lua),
        with the profile and earliest-begin ms (0: none) written in it.

        Compact on purpose, since a million may wait: fields at their defaults are left out
        (`a`, attempts so far, 0; `pl`, the payload, null) and readers fill them in. Under
        64 bytes, a scope's small hash stays in Redis's compact listpack encoding. The
        script reads kind, profile and date where this text starts them, not with a JSON
        parser (it is what a submit spends most on), and a FAIL strategy by its text. While
        tracing is on, bgqueue.tracing appends `tp`, the submit span's traceparent.
        """
        self._check_fields()
        date = self.earliest_begin_date
        begin = 0 if date is None else to_ms(date)
        profile = self.profile
        text = f'{_RECORD_HEADS[self.kind]}{profile},"e":{begin}'
        if self.payload is not None:
            text += f',"pl":{json.dumps(encode_payload(self.payload))}'
        return text + self._extra_record() + "}", profile, begin

    def _check_fields(self) -> None:
        if type(self) is BGTaskRequest:
            raise ParameterError("BGTaskRequest is abstract; use one of its request kinds")
        check_name(self.identifier, "identifier")
        date = self.earliest_begin_date
        if date is not None:
            if not isinstance(date, datetime):
                raise ParameterError(f"earliest_begin_date must be a datetime, got {date!r}")
            if date.tzinfo is None or date.utcoffset() is None:
                raise ParameterError("earliest_begin_date must be timezone-aware (e.g. tz=UTC)")
        network, power = self.requires_network_connectivity, self.requires_external_power
        if type(network) is not bool or type(power) is not bool:  # one test when both are
            _check_bool(network, "requires_network_connectivity")
            _check_bool(power, "requires_external_power")

    @property
    def protection_level(self) -> int:
        """Data protection a worker must open; only health research asks for one."""
        return 0

    @property
    def profile(self) -> int:
        """The requirement profile (0–15): network bit, power bit, protection level."""
        return (
            (_NETWORK if self.requires_network_connectivity else 0)
            | (_EXTERNAL_POWER if self.requires_external_power else 0)
            | self.protection_level << 2
        )

    def _extra_record(self) -> str:
        """The record's fields of this kind of request: JSON members, each after a comma."""
        return ""


@dataclass
class AppRefreshTaskRequest(BGTaskRequest):
    """A short refresh (Apple's BGAppRefreshTaskRequest), about 30 s of budget."""

    kind: ClassVar[Kind] = Kind.REFRESH


@dataclass
class ProcessingTaskRequest(BGTaskRequest):
    """Minutes of maintenance work (Apple's BGProcessingTaskRequest)."""

    kind: ClassVar[Kind] = Kind.PROCESSING


@dataclass
class HealthResearchTaskRequest(ProcessingTaskRequest):
    """Processing for a health study, needing a worker that can open protected data."""

    protection_type_of_required_data: FileProtectionType = FileProtectionType.COMPLETE

    kind: ClassVar[Kind] = Kind.HEALTH_RESEARCH

    def _check_fields(self) -> None:
        """As the base, plus a known FileProtectionType."""
        super()._check_fields()
        try:
            self.protection_type_of_required_data = FileProtectionType(
                self.protection_type_of_required_data
            )
        except ValueError:
            raise ParameterError(
                f"protection_type_of_required_data must be a FileProtectionType, "
                f"got {self.protection_type_of_required_data!r}"
            ) from None

    @property
    def protection_level(self) -> int:
        """The level of `protection_type_of_required_data`."""
        return FileProtectionType(self.protection_type_of_required_data).level


@dataclass
class ContinuedProcessingTaskRequest(BGTaskRequest):
    """User-visible work that starts now (or queues) and must keep reporting progress."""

    title: str = ""
    subtitle: str = ""
    strategy: ContinuedProcessingStrategy = ContinuedProcessingStrategy.FAIL

    kind: ClassVar[Kind] = Kind.CONTINUED_PROCESSING

    def _check_fields(self) -> None:
        """As the base, plus title, subtitle and a known strategy; no future start date."""
        super()._check_fields()
        date = self.earliest_begin_date
        if date is not None and date > datetime.now(UTC):
            raise ParameterError("a continued-processing request starts now: no future date")
        for name in ("title", "subtitle"):
            if not isinstance(getattr(self, name), str):
                raise ParameterError(f"{name} must be a string")
        try:
            self.strategy = ContinuedProcessingStrategy(self.strategy)
        except ValueError:
            raise ParameterError(
                f"strategy must be a ContinuedProcessingStrategy, got {self.strategy!r}"
            ) from None

    def _extra_record(self) -> str:
        """Title, subtitle and strategy."""
        title, subtitle = json.dumps(self.title), json.dumps(self.subtitle)
        # submit.lua finds the FAIL strategy by this text: keep it so.
        return f',"ti":{title},"su":{subtitle},"sg":"{self.strategy.value}"'


REQUEST_CLASSES: dict[Kind, type[BGTaskRequest]] = {
    Kind.REFRESH: AppRefreshTaskRequest,
    Kind.PROCESSING: ProcessingTaskRequest,
    Kind.HEALTH_RESEARCH: HealthResearchTaskRequest,
    Kind.CONTINUED_PROCESSING: ContinuedProcessingTaskRequest,
}


def from_record(identifier: str, record: dict[str, Any]) -> BGTaskRequest:
    """A fresh request object (a copy) rebuilt from its Redis record."""
    kind = Kind(record["k"])
    profile = int(record["r"])
    kwargs: dict[str, Any] = {
        "identifier": identifier,
        "earliest_begin_date": from_ms(record["e"]) if record["e"] else None,
        "requires_network_connectivity": bool(profile & Requirement.NETWORK),
        "requires_external_power": bool(profile & Requirement.EXTERNAL_POWER),
        "payload": json.loads(record.get("pl", "null")),
    }
    if kind is Kind.HEALTH_RESEARCH:
        kwargs["protection_type_of_required_data"] = list(FileProtectionType)[profile >> 2]
    if kind is Kind.CONTINUED_PROCESSING:
        kwargs.update(title=record["ti"], subtitle=record["su"], strategy=record["sg"])
    return REQUEST_CLASSES[kind](**kwargs)


@dataclass(frozen=True)
class TaskRecord:
    """One finished (or cancelled) run, newest first in `Scheduler.history`."""

    identifier: str
    scope: str
    kind: str
    state: str
    success: bool
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    attempt: int = 1
    request_id: int = 0
    reason: str = field(default="")

    @classmethod
    def from_json(cls, raw: bytes | str) -> TaskRecord:
        """Decode one history entry as written by the Lua scripts."""
        data = json.loads(raw)
        return cls(
            identifier=data["i"],
            scope=data["sc"],
            kind=data["k"],
            state=data["s"],
            success=bool(data.get("ok", False)),
            started_at=from_ms(data.get("sa")),
            finished_at=from_ms(data.get("fa")),
            worker=data.get("w") or None,
            attempt=int(data.get("a", 0)) + 1,
            request_id=int(data.get("g", 0)),
            reason=data.get("why", ""),
        )
