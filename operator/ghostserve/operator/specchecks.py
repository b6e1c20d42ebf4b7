"""The checks of a GhostServeDeployment spec that keep a bad spec from ever reaching the API server as a pod.

Pure functions returning readable messages. The CRD (charts/ghostserve/crds/) rejects the same things
server-side (its caps are the constants below; tests/charts/test_crd_caps.py keeps them equal), but an
API server with an older CRD or none must not make the operator build a pod the API server rejects,
loop on it, or crash with a TypeError: every field is type-checked here before anything reads it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ghostserve.operator import quantity

# Caps on what a CR may hold. kopf keeps the whole spec in an annotation (256 KiB for all annotations
# together), so the worst case of every cap at once must fit twice over (kubectl's client-side apply
# keeps another copy). The CRD carries the same numbers.
MAX_ARGS, MAX_ARG_LENGTH = 64, 512
MAX_ENV, MAX_ENV_NAME, MAX_ENV_VALUE = 32, 128, 1024
MAX_RESOURCES = 8  # entries in limits and in requests
MAX_NODE_SELECTOR = 16
MAX_TOLERATIONS = 16
MAX_MODEL_NAME, MAX_PATH, MAX_IMAGE = 256, 1024, 512
MAX_QUALIFIED_NAME, MAX_LABEL_VALUE, MAX_REF_NAME = 317, 63, 253
MAX_BUDGET_BYTES = 2**50  # 1 PiB: anything larger is a typo, and overflows int64 arithmetic downstream

ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# [prefix/]name as in labels, taints and resource names: a DNS subdomain prefix and a 63-char name.
QUALIFIED = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DOT_DOT = re.compile(r"(^|/)\.\.(/|$)")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
VALUE_FROM = {
    "fieldRef": ({"fieldPath"}, {"apiVersion"}),
    "resourceFieldRef": ({"resource"}, {"containerName", "divisor"}),
    "configMapKeyRef": ({"name", "key"}, {"optional"}),
    "secretKeyRef": ({"name", "key"}, {"optional"}),
}
REMOVED = {
    ("sidecar",): "spec.sidecar was removed: the sidecar's socket directory and port come from the chart "
    "(operator flags --sidecar-socket-dir / --sidecar-port), never from a GhostServeDeployment",
    ("protection", "recompute"): "spec.protection.recompute was removed: the sidecar's planner chooses "
    "rebuild or recompute per chunk by cost",
}


SECTIONS = ("model", "engine", "protection", "recovery", "sidecar")


def shape_problems(raw_spec: Any) -> list[str]:
    """The spec and each of its sections must be mappings before defaults can be merged into them."""
    if raw_spec is None:
        return []
    if not isinstance(raw_spec, Mapping):
        return [f"spec must be a mapping, got {type(raw_spec).__name__}"]
    return [
        f"spec.{section} must be a mapping, got {raw_spec[section]!r}"[:300]
        for section in SECTIONS
        if raw_spec.get(section) is not None and not isinstance(raw_spec[section], Mapping)
    ]


def removed_fields(raw_spec: Mapping[str, Any]) -> list[str]:
    """Fields a user may no longer set (checked on the spec as written, before defaults are filled in)."""
    found = []
    for path, message in REMOVED.items():
        node: Any = raw_spec
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            found.append(message)
    return found


def _str(errors: list[str], where: str, value: Any, cap: int, *, required: bool = False) -> bool:
    if value is None and not required:
        return False
    if not isinstance(value, str) or (required and not value):
        errors.append(f"{where} must be a{' non-empty' if required else ''} string, got {value!r}"[:300])
        return False
    if len(value) > cap:
        errors.append(f"{where} is {len(value)} characters long (at most {cap})")
        return False
    return True


def _list(errors: list[str], where: str, value: Any, cap: int) -> list[Any]:
    if not isinstance(value, list):
        errors.append(f"{where} must be a list, got {type(value).__name__}")
        return []
    if len(value) > cap:
        errors.append(f"{where} has {len(value)} entries (at most {cap})")
        return []
    return value


def _map(errors: list[str], where: str, value: Any, cap: int) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        errors.append(f"{where} must be a mapping, got {type(value).__name__} {value!r}"[:300])
        return {}
    if len(value) > cap:
        errors.append(f"{where} has {len(value)} entries (at most {cap})")
        return {}
    return value


def _qualified(errors: list[str], where: str, key: Any) -> bool:
    if not isinstance(key, str) or len(key) > MAX_QUALIFIED_NAME or not QUALIFIED.match(key):
        errors.append(f"{where}: {key!r} is not a valid [prefix/]name")
        return False
    return True


def check_model(errors: list[str], model: Any) -> None:
    model = _map(errors, "model", model, 8)
    _str(errors, "model.name", model.get("name"), MAX_MODEL_NAME)
    if _str(errors, "model.path", model.get("path"), MAX_PATH):
        path = model["path"]
        if not path.startswith("/") or DOT_DOT.search(path) or "\x00" in path:
            errors.append(f"model.path must be an absolute path without '..' segments, got {path!r}")


def check_resources(errors: list[str], resources: Any) -> None:
    res = _map(errors, "engine.resources", resources, 2)
    for key in res:
        if key not in ("limits", "requests"):
            errors.append(f"engine.resources.{key} is not supported (only limits and requests)")
    parsed: dict[str, dict[str, Any]] = {}
    for part in ("limits", "requests"):
        if part not in res:
            continue
        entries = _map(errors, f"engine.resources.{part}", res[part], MAX_RESOURCES)
        parsed[part] = {}
        for name, value in entries.items():
            if not _qualified(errors, f"engine.resources.{part}", name):
                continue
            try:
                amount = quantity.parse(value)
            except quantity.QuantityError as exc:
                errors.append(f"engine.resources.{part}.{name}: {exc}")
                continue
            if amount < 0:
                errors.append(f"engine.resources.{part}.{name} must not be negative, got {value!r}")
            parsed[part][name] = amount
    for name, request in parsed.get("requests", {}).items():
        limit = parsed.get("limits", {}).get(name)
        if limit is not None and request > limit:
            errors.append(
                f"engine.resources.requests.{name} ({res['requests'][name]}) is above its limit "
                f"({res['limits'][name]})"
            )


def _check_value_from(errors: list[str], where: str, value_from: Any) -> None:
    source = _map(errors, where, value_from, 1)
    if len(source) != 1:
        errors.append(f"{where} must name exactly one of {', '.join(VALUE_FROM)}")
        return
    kind, ref = next(iter(source.items()))
    if kind not in VALUE_FROM:
        errors.append(f"{where}.{kind} is not supported (one of {', '.join(VALUE_FROM)})")
        return
    needed, optional = VALUE_FROM[kind]
    fields = _map(errors, f"{where}.{kind}", ref, len(needed) + len(optional))
    for key in fields:
        if key not in needed | optional:
            errors.append(f"{where}.{kind}.{key} is not a field of {kind}")
    for key in sorted(needed):
        _str(errors, f"{where}.{kind}.{key}", fields.get(key), MAX_REF_NAME, required=True)
    if "optional" in fields and not isinstance(fields["optional"], bool):
        errors.append(f"{where}.{kind}.optional must be true or false")
    if kind == "resourceFieldRef" and "divisor" in fields:
        try:
            quantity.parse(fields["divisor"])
        except quantity.QuantityError as exc:
            errors.append(f"{where}.{kind}.divisor: {exc}")


def check_env(errors: list[str], env: Any) -> None:
    for i, entry in enumerate(_list(errors, "engine.env", env, MAX_ENV)):
        where = f"engine.env[{i}]"
        item = _map(errors, where, entry, 3)
        for key in item:
            if key not in ("name", "value", "valueFrom"):
                errors.append(f"{where}.{key} is not a field of an EnvVar")
        named = _str(errors, f"{where}.name", item.get("name"), MAX_ENV_NAME, required=True)
        if named and not ENV_NAME.match(item["name"]):
            errors.append(f"{where}.name {item['name']!r} is not a valid environment variable name")
        _str(errors, f"{where}.value", item.get("value"), MAX_ENV_VALUE)
        if "value" in item and "valueFrom" in item:
            errors.append(f"{where} may not have both value and valueFrom")
        if "valueFrom" in item:
            _check_value_from(errors, f"{where}.valueFrom", item["valueFrom"])


def check_node_selector(errors: list[str], selector: Any) -> None:
    for key, value in _map(errors, "engine.nodeSelector", selector, MAX_NODE_SELECTOR).items():
        _qualified(errors, "engine.nodeSelector", key)
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not LABEL_VALUE.match(value):
            errors.append(f"engine.nodeSelector[{key!r}]: {value!r} is not a valid label value")


def check_tolerations(errors: list[str], tolerations: Any) -> None:
    for i, entry in enumerate(_list(errors, "engine.tolerations", tolerations, MAX_TOLERATIONS)):
        where = f"engine.tolerations[{i}]"
        tol = _map(errors, where, entry, len(TOLERATION_KEYS))
        for key in tol:
            if key not in TOLERATION_KEYS:
                errors.append(f"{where}.{key} is not a field of a Toleration")
        key, op = tol.get("key", ""), tol.get("operator", "Equal")
        if key and _str(errors, f"{where}.key", key, MAX_QUALIFIED_NAME):
            _qualified(errors, f"{where}.key", key)
        if op not in ("Exists", "Equal"):
            errors.append(f"{where}.operator must be Exists or Equal, got {op!r}")
        value = tol.get("value", "")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not LABEL_VALUE.match(value):
            errors.append(f"{where}.value {value!r} is not a valid label value")
        elif op == "Exists" and value:
            errors.append(f"{where}.value must be empty when operator is Exists")
        if not key and op != "Exists":
            errors.append(f"{where}: operator must be Exists when key is empty")
        effect = tol.get("effect", "")
        if effect not in EFFECTS:
            errors.append(f"{where}.effect must be NoSchedule, PreferNoSchedule or NoExecute, got {effect!r}")
        seconds = tol.get("tolerationSeconds")
        if seconds is not None:
            if not isinstance(seconds, int) or isinstance(seconds, bool):
                errors.append(f"{where}.tolerationSeconds must be an integer, got {seconds!r}")
            elif effect != "NoExecute":
                errors.append(f"{where}.tolerationSeconds needs effect NoExecute")


def check_budget(errors: list[str], budget: Any) -> None:
    try:
        size = quantity.to_bytes(budget)
    except quantity.QuantityError as exc:
        errors.append(f"protection.hostMemoryBudget: {exc}")
        return
    if size > MAX_BUDGET_BYTES:
        errors.append(f"protection.hostMemoryBudget {budget!r} is above 1Pi")


def problems(name: str, spec: Mapping[str, Any]) -> list[str]:
    """Every problem of the fields above in a defaulted spec ([] when they are all usable)."""
    errors: list[str] = []
    check_model(errors, spec.get("model", {}))
    engine = spec.get("engine")
    if not isinstance(engine, Mapping):
        return [*errors, "engine must be a mapping"]
    _str(errors, "engine.image", engine.get("image"), MAX_IMAGE)
    for i, arg in enumerate(_list(errors, "engine.args", engine.get("args", []), MAX_ARGS)):
        _str(errors, f"engine.args[{i}]", arg, MAX_ARG_LENGTH, required=False)
    # Present but falsy (0, None, "") is an error too: the pod builder iterates these as they are.
    check_resources(errors, engine.get("resources", {}))
    check_env(errors, engine.get("env", []))
    check_node_selector(errors, engine.get("nodeSelector", {}))
    check_tolerations(errors, engine.get("tolerations", []))
    if isinstance(spec.get("protection"), Mapping):
        check_budget(errors, spec["protection"].get("hostMemoryBudget"))
    return errors


def parity_budget_bytes(spec: Mapping[str, Any]) -> int:
    """The group's parity budget in bytes (GHOSTSERVE_PARITY_BUDGET); the spec must have passed `problems`."""
    return quantity.to_bytes(spec["protection"]["hostMemoryBudget"])
