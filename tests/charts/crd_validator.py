"""A structural-schema validator for custom resources, doing what the API server does on create:

1. defaulting (`default:` values, recursively, so `protection: {}` gets every nested default);
2. OpenAPI v3 validation (types, required, enum, min/max, pattern, length) through jsonschema, with
   unknown fields rejected as `kubectl apply --validate=strict` does (except under
   `x-kubernetes-preserve-unknown-fields`);
3. every `x-kubernetes-validations` CEL rule, evaluated with cel-python on the defaulted object.

Pure functions over dicts; no cluster. The CRD is the one in charts/ghostserve/crds/.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema

# OpenAPI keywords that mean the same in JSON Schema; everything else is handled or dropped.
_SAME = (
    "type", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "minProperties", "maxProperties", "format",
)  # fmt: skip
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time")
def _is_date_time(value: object) -> bool:
    """RFC 3339, as the API server checks `format: date-time` (jsonschema ships no checker for it)."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return False
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Violation:
    """One reason the API server would reject the object.

    source: "schema" (OpenAPI) or "cel"; rule: the schema keyword (required, enum, ...) or the CEL
    expression; path: dotted path of the offending field; message: what a user would read."""

    source: str
    rule: str
    path: str
    message: str


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema equivalent of one OpenAPI v3 structural-schema node (recursively)."""
    out: dict[str, Any] = {key: node[key] for key in _SAME if key in node}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    if "properties" in node:
        out["properties"] = {name: to_json_schema(sub) for name, sub in node["properties"].items()}
    if "required" in node:
        out["required"] = list(node["required"])
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = to_json_schema(additional)
    elif node.get("type") == "object" and "properties" in node:
        # Strict field validation: unknown fields are errors, unless the schema keeps them.
        out["additionalProperties"] = bool(node.get("x-kubernetes-preserve-unknown-fields", False))
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """A copy of obj with every missing field that has a `default:` filled in, parents before
    children (a defaulted `{}` then gets its own fields' defaults). obj itself is not mutated."""
    result = copy.deepcopy(obj)
    _default_into(schema, result)
    return result


def _default_into(schema: dict[str, Any], obj: Any) -> None:
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                _default_into(sub, obj[name])
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            _default_into(schema["items"], item)


class CRDValidator:
    """Validates objects against one version of a CustomResourceDefinition.

    Construction compiles every CEL rule once; a rule that does not parse raises celpy.CELParseError."""

    def __init__(self, crd: dict[str, Any], version: str) -> None:
        matches = [v for v in crd["spec"]["versions"] if v["name"] == version]
        if not matches:
            raise ValueError(f"CRD {crd['metadata']['name']} has no version {version!r}")
        self.schema: dict[str, Any] = matches[0]["schema"]["openAPIV3Schema"]
        self._json_schema = jsonschema.Draft202012Validator(
            to_json_schema(self.schema), format_checker=FORMATS
        )
        self._env = celpy.Environment()
        self._programs = {rule: self._env.program(self._env.compile(rule)) for rule in self.rules()}

    def rules(self) -> list[str]:
        """Every CEL rule of the schema, in document order."""
        return [rule["rule"] for _, rules in _rule_sites(self.schema, ()) for rule in rules]

    def violations(self, obj: dict[str, Any]) -> list[Violation]:
        """Everything the API server would reject obj for, after defaulting; [] when obj is valid."""
        defaulted = apply_defaults(self.schema, obj)
        found = [
            Violation("schema", str(error.validator), _dotted(error.absolute_path), error.message)
            for error in self._json_schema.iter_errors(defaulted)
        ]
        return found + list(self._cel_violations(self.schema, defaulted, ()))

    def _cel_violations(self, schema: dict[str, Any], obj: Any, path: tuple[str, ...]) -> Iterator[Violation]:
        for rule in schema.get("x-kubernetes-validations", []):
            target = _dotted((*path, *rule.get("fieldPath", "").lstrip(".").split(".")))
            try:
                ok = self._programs[rule["rule"]].evaluate({"self": celpy.json_to_cel(obj)})
            except celpy.CELEvalError as error:
                yield Violation("cel", rule["rule"], target, f"{rule['message']} (evaluation error: {error})")
                continue
            if not bool(ok):
                yield Violation("cel", rule["rule"], target, rule["message"])
        if isinstance(obj, dict):
            for name, sub in schema.get("properties", {}).items():
                if name in obj:
                    yield from self._cel_violations(sub, obj[name], (*path, name))
        elif isinstance(obj, list) and "items" in schema:
            for index, item in enumerate(obj):
                yield from self._cel_violations(schema["items"], item, (*path, str(index)))


def _rule_sites(
    schema: dict[str, Any], path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], list[dict[str, Any]]]]:
    if "x-kubernetes-validations" in schema:
        yield path, schema["x-kubernetes-validations"]
    for name, sub in schema.get("properties", {}).items():
        yield from _rule_sites(sub, (*path, name))
    if "items" in schema:
        yield from _rule_sites(schema["items"], (*path, "[]"))


def _dotted(path: Any) -> str:
    return ".".join(str(part) for part in path if part != "")
