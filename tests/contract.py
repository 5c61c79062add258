"""Check webhook payloads and decisions against the contract in ``openapi/milterbridge.yaml``.

A helper for tests, not a test module. The document is loaded once; each webhook's request
and ``200`` schemas are validated with JSON Schema Draft 2020-12 (what OpenAPI 3.1 uses),
with ``$ref`` resolved inside the document through a :mod:`referencing` registry::

    from tests.contract import validate_request, validate_decision

    validate_request("eom", payload)          # raises jsonschema.ValidationError
    validate_decision("rcpt", {"action": "reject"})

Three deliberate differences from a bare ``Draft202012Validator``:

* ``format`` is checked (``date-time`` for ``timestamp``).
* ``pattern`` follows ECMA-262, as JSON Schema specifies: ``$`` matches only at the very
  end. Python's ``$`` also matches before a final newline, which would let ``"X-Tag\\n"``
  through the header-name pattern.
* A ``oneOf`` with an OpenAPI ``discriminator`` checks only the branch the discriminator
  names (when it names one); same verdict, since each branch pins the value with ``const``.

Errors: jsonschema's ``ValidationError`` for a payload that breaks the contract;
``ValueError`` for a name that is not an event (or asks for the decision of a notification).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import relevance
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = [
    "SPEC_PATH",
    "SPEC",
    "EVENTS",
    "DECISION_EVENTS",
    "NOTIFICATION_EVENTS",
    "ValidationError",
    "validate_request",
    "validate_decision",
    "request_examples",
    "decision_examples",
    "legal_actions",
]

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi" / "milterbridge.yaml"
#: Base URI the document is registered under; only used to resolve references.
_SPEC_URI = "urn:milterbridge:openapi"


def _load() -> dict[str, Any]:
    with SPEC_PATH.open(encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict):
        raise TypeError(f"{SPEC_PATH.name}: not a mapping")
    return spec


#: The parsed document (do not mutate).
SPEC: dict[str, Any] = _load()
EVENTS: tuple[str, ...] = tuple(SPEC["webhooks"])
#: Events whose response is ignored (tagged ``notifications`` in the document).
NOTIFICATION_EVENTS: tuple[str, ...] = tuple(
    e for e in EVENTS if "notifications" in SPEC["webhooks"][e]["post"]["tags"]
)
DECISION_EVENTS: tuple[str, ...] = tuple(e for e in EVENTS if e not in NOTIFICATION_EVENTS)

_REGISTRY: Registry[Any] = Registry().with_resource(
    _SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)


@functools.cache
def _compile(pattern: str) -> re.Pattern[str]:
    # Every pattern in the document is anchored as ^...$; ECMA-262's final $ is Python's \Z.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _ecma_pattern(
    validator: Validator, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_STANDARD_ONE_OF = Draft202012Validator.VALIDATORS["oneOf"]


def _discriminated_one_of(
    validator: Validator, one_of: list[Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    # OpenAPI's discriminator names the branch, as OpenAPI tools use it. Every mapped schema
    # pins the property with `const` (tests check it), so this is plain oneOf, minus the cost
    # of running every branch over every item (1000 modifications x 8 ops x 7 actions).
    discriminator = schema.get("discriminator")
    if discriminator is not None and validator.is_type(instance, "object"):
        value = instance.get(discriminator["propertyName"])
        target = discriminator.get("mapping", {}).get(value) if isinstance(value, str) else None
        if target is not None:
            yield from validator.descend(instance, {"$ref": target})
            return
    yield from _STANDARD_ONE_OF(validator, one_of, instance, schema)


_ContractValidator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern, "oneOf": _discriminated_one_of})


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _check_event(event: str) -> None:
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")


@functools.cache
def _validator(*parts: str) -> Validator:
    schema = {"$ref": f"{_SPEC_URI}#/{_pointer(*parts)}"}
    validator: Validator = _ContractValidator(
        schema, registry=_REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    return validator


def _ruled_out(errors: list[ValidationError]) -> bool:
    # A oneOf branch whose discriminator (`action`, `op`) or JSON type did not match is not the
    # branch the sender meant; its other errors would only mislead.
    return any(
        (e.validator == "const" and len(e.relative_path) == 1) or (e.validator == "type" and not e.relative_path)
        for e in errors
    )


def _most_useful(errors: list[ValidationError]) -> ValidationError:
    error = max(errors, key=relevance)
    while error.context:
        candidates = error.context
        if error.validator in ("oneOf", "anyOf"):
            branches: dict[object, list[ValidationError]] = {}
            for sub in error.context:
                branches.setdefault(sub.schema_path[0], []).append(sub)
            live = [b for b in branches.values() if not _ruled_out(b)]
            if len(live) != 1:
                return error
            candidates = live[0]
        error = max(candidates, key=relevance)
    return error


def _raise_first(validator: Validator, instance: object) -> None:
    errors = list(validator.iter_errors(instance))
    if errors:
        error = _most_useful(errors)
        # Re-rooted so that the message and .path name the place in the whole payload.
        raise ValidationError(
            error.message,
            validator=error.validator,
            path=error.absolute_path,
            schema_path=error.absolute_schema_path,
            instance=error.instance,
            schema=error.schema,
            validator_value=error.validator_value,
        )


def validate_request(event: str, payload: dict[str, Any]) -> None:
    """Validate a request body the bridge sent for ``event``; raise ValidationError if it breaks the contract."""
    _check_event(event)
    validator = _validator("webhooks", event, "post", "requestBody", "content", "application/json", "schema")
    _raise_first(validator, payload)


def validate_decision(event: str, decision: object) -> None:
    """Validate an endpoint's ``200`` body for ``event``; raise ValidationError if the bridge must refuse it."""
    _check_event(event)
    if event in NOTIFICATION_EVENTS:
        raise ValueError(f"{event!r} is a notification: its response is ignored, there is no decision")
    validator = _validator("webhooks", event, "post", "responses", "200", "content", "application/json", "schema")
    _raise_first(validator, decision)


def legal_actions(event: str) -> frozenset[str]:
    """The actions the ``event`` decision schema accepts, found by validating each bare action."""
    _check_event(event)
    if event in NOTIFICATION_EVENTS:
        return frozenset()
    validator = _validator("webhooks", event, "post", "responses", "200", "content", "application/json", "schema")
    actions = SPEC["components"]["schemas"]["Action"]["enum"]
    return frozenset(a for a in actions if validator.is_valid({"action": a}))


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise ValueError(f"only local references are supported, got {ref!r}")
    target: Any = SPEC
    for part in ref[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return _resolve(target)


def _examples(media: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, example in media.get("examples", {}).items():
        yield name, _resolve(example)["value"]


def request_examples() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every request example in the document, as (event, payload)."""
    for event in EVENTS:
        media = SPEC["webhooks"][event]["post"]["requestBody"]["content"]["application/json"]
        for _name, value in _examples(media):
            yield event, value


def decision_examples() -> Iterator[tuple[str, Any]]:
    """Every decision example in the document, as (event, decision)."""
    for event in DECISION_EVENTS:
        media = SPEC["webhooks"][event]["post"]["responses"]["200"]["content"]["application/json"]
        for _name, value in _examples(media):
            yield event, value
