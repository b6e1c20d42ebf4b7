"""One log style (docs/design.md §10): a constant event name, the fields in `extra`. Checked statically
over the sidecar, the operator, the reference engine and the embedded cluster: no f-strings, JSON
strings or %-arguments in their log calls. (The SGLang plugin and the adapter it shares log through
sglang's text handlers.)"""

from __future__ import annotations

import ast
import pathlib

LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
ROOTS = (
    "sidecar/ghostserve/sidecar",
    "operator/ghostserve/operator",
    "engine/ghostserve/engine/reference",
    "cluster/ghostserve/cluster",
)
# kopf posts this object logger's warnings as Kubernetes Events: that one keeps a readable sentence.
ALLOWED = {("operator/ghostserve/operator/handlers.py", "reconcile failed")}


def offending_calls(path: pathlib.Path, rel: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr not in LEVELS:
            continue
        owner = node.func.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if name not in ("log", "logger") or not node.args:
            continue
        first = node.args[0]
        text = ast.unparse(first)
        if any(rel == f and snippet in text for f, snippet in ALLOWED):
            continue
        formatted = isinstance(first, ast.JoinedStr) or len(node.args) > 1
        if formatted or "json.dumps" in text or text.startswith("'{"):
            out.append(f"{rel}:{node.lineno}: {text[:60]}")
    return out


def test_log_calls_pass_an_event_name_and_extra(repo_root: pathlib.Path) -> None:
    bad = [
        hit
        for root in ROOTS
        for path in sorted((repo_root / root).rglob("*.py"))
        for hit in offending_calls(path, path.relative_to(repo_root).as_posix())
    ]
    assert bad == []
