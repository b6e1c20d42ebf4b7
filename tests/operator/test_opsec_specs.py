"""Every CR either works or is reported: specs the API server would turn into rejected pods (or that
made the operator raise TypeError) are refused by `specs.checked` with a clear message, random junk in
any field never raises anything but SpecError, and every pod built from an accepted spec passes the
pod policy. Pure: no cluster."""

from __future__ import annotations

import copy
import fractions
import random
from typing import Any

import pytest
from ghostserve.operator import backoff, conditions, podpolicy, pods, quantity, specchecks, specs

BASE: dict[str, Any] = {
    "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
    "engine": {"image": "lmsysorg/sglang:v0.5.3", "tensorParallel": 2},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    node = spec
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return spec


# (field, bad value, words the message must contain): the issue's list first.
REJECTED = [
    ("engine.resources", {"limits": "8"}, "engine.resources.limits must be a mapping"),
    ("engine.env", [{"value": "x"}], "engine.env[0].name must be a non-empty string"),
    ("engine.env", [{"name": "1BAD=", "value": "x"}], "not a valid environment variable name"),
    (
        "engine.env",
        [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "a"}}}],
        "both value and valueFrom",
    ),
    ("engine.env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}], "secretKeyRef.key"),
    ("engine.resources", {"limits": {"memory": "64GB"}}, "'64GB' is not a quantity"),
    ("engine.resources", {"limits": {"cpu": "2"}, "requests": {"cpu": "3"}}, "requests.cpu (3) is above"),
    ("engine.resources", {"limits": {"memory": "1Gi"}, "requests": {"memory": "1025Mi"}}, "above its limit"),
    ("engine.resources", {"claims": [{"name": "x"}]}, "engine.resources.claims is not supported"),
    ("engine.tolerations", [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}], "NoExecute"),
    ("engine.tolerations", [{"key": "a", "operator": "Exists", "value": "b"}], "must be empty"),
    (
        "engine.tolerations",
        [{"operator": "Equal", "value": "b"}],
        "operator must be Exists when key is empty",
    ),
    ("engine.tolerations", [{"key": "a", "operator": "In"}], "operator must be Exists or Equal"),
    ("engine.tolerations", [{"key": "a", "effect": "NoRun"}], "effect must be"),
    ("engine.tolerations", ["a"], "engine.tolerations[0] must be a mapping"),
    ("engine.nodeSelector", {"a": 1}, "is not a valid label value"),
    ("engine.nodeSelector", {"bad key!": "a"}, "not a valid [prefix/]name"),
    ("model.path", "/models/../etc/shadow", "without '..' segments"),
    ("model.path", "models/llama", "must be an absolute path"),
    ("engine.args", ["--x"] * 65, "engine.args has 65 entries (at most 64)"),
    ("engine.args", ["x" * 513], "engine.args[0] is 513 characters long"),
    ("engine.args", [1], "engine.args"),
    ("engine.image", "i" * 513, "engine.image is 513 characters long"),
    ("protection.hostMemoryBudget", "2Ei", "above 1Pi"),
    ("protection.hostMemoryBudget", "1e999", "exponent out of range"),
    ("sidecar", {"socketDir": "/"}, "spec.sidecar was removed"),
    ("sidecar", {"port": 22}, "spec.sidecar was removed"),
    ("protection.recompute", "hybrid", "spec.protection.recompute was removed"),
    ("engine", "sglang", "spec.engine must be a mapping"),
    ("protection", ["xor"], "spec.protection must be a mapping"),
]


@pytest.mark.parametrize(
    ("field", "value", "words"), REJECTED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REJECTED)]
)
def test_bad_field_is_refused_with_a_clear_message(field: str, value: Any, words: str) -> None:
    with pytest.raises(specs.SpecError) as caught:
        specs.checked("llama", _with(field, value))
    assert words in str(caught.value), str(caught.value)


ACCEPTED = [
    (
        "engine.resources",
        {"limits": {"cpu": 8, "memory": "64Gi"}, "requests": {"cpu": "500m", "memory": 10**9}},
    ),
    (
        "engine.env",
        [
            {"name": "HF_HOME", "value": "/tmp/hf"},
            {
                "name": "TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token", "optional": True}},
            },
        ],
    ),
    (
        "engine.tolerations",
        [
            {"operator": "Exists"},
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
        ],
    ),
    ("engine.nodeSelector", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
    ("model.path", "/models/llama..v2/weights"),  # '..' inside a name is not a parent segment
]


@pytest.mark.parametrize(("field", "value"), ACCEPTED)
def test_good_field_is_accepted_and_built_into_a_policy_clean_pod(field: str, value: Any) -> None:
    full = specs.checked("llama", _with(field, value))
    pod = pods.build_replica_pod("ns", "llama", full, 0)
    checked = podpolicy.enforce(pod, podpolicy.Policy())
    assert checked["spec"]["securityContext"]["runAsNonRoot"] is True


def test_parity_budget_reaches_the_engine_in_bytes() -> None:
    full = specs.checked("llama", _with("protection.hostMemoryBudget", "1.5Gi"))
    env = {
        e["name"]: e.get("value")
        for e in pods.build_replica_pod("ns", "llama", full, 0)["spec"]["containers"][0]["env"]
    }
    assert env["GHOSTSERVE_PARITY_BUDGET"] == str(3 * 2**29)


def _junk(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [None, True, -1, 0, 7, 2**70, 1.5, "", "8", "64Gi", "..", "/", "x" * 600, "a=b"]
    if depth < 2:
        choices += [
            [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            {rng.choice(["name", "value", "key", "limits", "cpu", "valueFrom", "x"]): _junk(rng, depth + 1)},
        ]
    return rng.choice(choices)


FIELDS = [
    "model", "model.name", "model.path", "engine", "engine.image", "engine.args", "engine.tensorParallel",
    "engine.replicas", "engine.resources", "engine.resources.limits", "engine.resources.requests",
    "engine.env", "engine.nodeSelector", "engine.tolerations", "protection", "protection.code",
    "protection.hostMemoryBudget", "protection.parityShards", "recovery", "recovery.faultPolicy",
]  # fmt: skip


def test_junk_in_any_field_is_a_spec_error_or_a_buildable_pod() -> None:
    """No field, whatever its type, can make the operator raise anything but SpecError (the old code
    raised TypeError once a second for `resources: {limits: "8"}`)."""
    rng = random.Random(1234)
    accepted = 0
    for _ in range(3000):
        spec = copy.deepcopy(BASE)
        for field in rng.sample(FIELDS, rng.randint(1, 3)):
            node = spec
            *parents, last = field.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[last] = _junk(rng)
        try:
            full = specs.checked("llama", spec)
        except specs.SpecError:
            continue
        accepted += 1
        for replica in range(full["engine"]["replicas"]):
            podpolicy.enforce(pods.build_replica_pod("ns", "llama", full, replica), podpolicy.Policy())
    assert accepted > 0  # the generator also produces usable specs, so both paths ran


@pytest.mark.parametrize(
    ("text", "exact"),
    [("8", 8), ("500m", fractions.Fraction(1, 2)), ("64Gi", 64 * 2**30), ("1e3", 1000), ("1.5k", 1500),
     (".5Mi", 2**19), ("+2", 2), (3, 3)],
)  # fmt: skip
def test_quantities_parse_exactly(text: Any, exact: Any) -> None:
    assert quantity.parse(text) == exact


@pytest.mark.parametrize("text", ["64GB", "Gi", "", "1.2.3", "1e", "0x10", True, 1.5, None, "1" * 65])
def test_non_quantities_are_refused(text: Any) -> None:
    with pytest.raises(quantity.QuantityError):
        quantity.parse(text)


def test_memory_bytes_round_up() -> None:
    assert quantity.to_bytes("1.5Gi") == 3 * 2**29 and quantity.to_bytes("1500m") == 2


# ---- pod policy --------------------------------------------------------------------------------


def _pod() -> dict[str, Any]:
    return pods.build_replica_pod("ns", "llama", specs.checked("llama", BASE), 0)


def test_policy_takes_host_paths_from_the_chart_not_the_spec() -> None:
    pod = _pod()
    for volume in pod["spec"]["volumes"]:
        volume["hostPath"]["path"] = "/"  # whatever a builder or a spec put there
    out = podpolicy.enforce(pod, podpolicy.Policy(socket_dir="/var/run/gs", shm_dir="/dev/shm/gs"))
    paths = {v["name"]: v["hostPath"]["path"] for v in out["spec"]["volumes"]}
    assert paths == {podpolicy.SOCKET_VOLUME: "/var/run/gs", podpolicy.POOLS_VOLUME: "/dev/shm/gs"}
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/"  # the input is not mutated


def test_policy_runs_pods_non_root_unless_the_chart_allows_root() -> None:
    out = podpolicy.enforce(_pod(), podpolicy.Policy(run_as_user=1234))
    ctx = out["spec"]["securityContext"]
    assert (ctx["runAsNonRoot"], ctx["runAsUser"], ctx["runAsGroup"]) == (True, 1234, 1234)
    assert ctx["supplementalGroups"] == [2000]  # the socket group the builder set is kept
    container = out["spec"]["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False and container["capabilities"] == {"drop": ["ALL"]}
    rooted = podpolicy.enforce(_pod(), podpolicy.Policy(allow_root=True))
    assert "runAsNonRoot" not in rooted["spec"]["securityContext"]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (
            lambda p: p["spec"]["volumes"].append({"name": "root", "hostPath": {"path": "/"}}),
            "hostPath volume 'root'",
        ),
        (lambda p: p["spec"].update(hostNetwork=True), "hostNetwork"),
        (lambda p: p["spec"].update(hostPID=True), "hostPID"),
        (lambda p: p["spec"]["containers"][0].update(securityContext={"privileged": True}), "privileged"),
        (
            lambda p: p["spec"]["containers"][0].update(
                securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}
            ),
            "added capabilities",
        ),
        (lambda p: p["spec"].update(securityContext={"runAsUser": 0}), "must not run as root"),
        (
            lambda p: p["spec"]["containers"][0].update(securityContext={"runAsUser": 0}),
            "must not run as root",
        ),
    ],
)
def test_policy_refuses_host_access(mutate: Any, words: str) -> None:
    pod = _pod()
    mutate(pod)
    with pytest.raises(podpolicy.PolicyError, match=words):
        podpolicy.enforce(pod, podpolicy.Policy())


# ---- backoff and the failure condition -----------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    b = backoff.Backoff(base=1.0, cap=60.0, rng=random.Random(7))
    delays = [b.fail() for _ in range(10)]
    for n, delay in enumerate(delays, start=1):
        top = min(60.0, 2.0 ** (n - 1))
        assert top / 2 <= delay <= top
    assert len({round(d, 6) for d in delays[-3:]}) == 3  # jitter: capped delays still differ
    b.succeed()
    assert b.fail() <= 1.0


def test_ready_false_replaces_only_ready_and_keeps_its_transition_time() -> None:
    old = [
        {"type": "Ready", "status": "True", "reason": "AllRanksReady", "lastTransitionTime": "t0"},
        {"type": "Protected", "status": "True", "reason": "Parity", "lastTransitionTime": "t0"},
    ]
    first = conditions.with_ready_false(old, reason="PodRejected", message="m1", generation=3, now="t1")
    assert [c["type"] for c in first] == ["Protected", "Ready"]
    ready = first[-1]
    assert (ready["status"], ready["reason"], ready["message"], ready["observedGeneration"]) == (
        "False", "PodRejected", "m1", 3,
    )  # fmt: skip
    assert ready["lastTransitionTime"] == "t1"
    again = conditions.with_ready_false(first, reason="PodRejected", message="m2", generation=3, now="t2")
    assert again[-1]["lastTransitionTime"] == "t1" and again[-1]["message"] == "m2"


def test_checks_cover_every_cap_constant() -> None:
    """A spec exactly at every cap is accepted (the caps are limits, not off by one)."""
    spec = copy.deepcopy(BASE)
    spec["engine"]["args"] = ["a" * specchecks.MAX_ARG_LENGTH] * specchecks.MAX_ARGS
    spec["engine"]["env"] = [
        {"name": f"E{i}".ljust(specchecks.MAX_ENV_NAME, "X"), "value": "v" * specchecks.MAX_ENV_VALUE}
        for i in range(specchecks.MAX_ENV)
    ]
    spec["engine"]["tolerations"] = [
        {"key": f"k{i}", "operator": "Exists"} for i in range(specchecks.MAX_TOLERATIONS)
    ]
    spec["engine"]["nodeSelector"] = {f"k{i}": "v" for i in range(specchecks.MAX_NODE_SELECTOR)}
    specs.checked("llama", spec)
