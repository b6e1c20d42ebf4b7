"""The chart's transport security (tls.mode): mutual TLS by default, with cert-manager certificates
that name exactly the identities the sidecars pin; your own Secrets (secret); plaintext only when
asked for (insecure), with a warning. The flags are read by the operator's and the sidecar's own
parsers, and the sidecar's own authorization policy judges the certificate names."""

from __future__ import annotations

import copy
import pathlib
import re
import shutil
from types import ModuleType
from typing import Any

import certmanager_shape
import chart_support
import helm_python
import pytest
from ghostserve.operator import main as operator_main
from ghostserve.sidecar import authz
from ghostserve.sidecar import flags as sidecar_flags

MODE_MESSAGE = "use cert-manager (mTLS with certificates from cert-manager), secret (mTLS with Secrets"


def _render(render_script: ModuleType, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return chart_support.objects(render_script.render(values))


def _notes(values: dict[str, Any] | None, chart: pathlib.Path = chart_support.CHART) -> str:
    with helm_python.Chart.load(chart) as loaded:
        out = loaded.render(values, name="ghostserve", namespace="ghostserve-system", is_install=True)
    return str(out["ghostserve/templates/NOTES.txt"])


def _workload(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [o for o in objs if o["kind"] == kind]
    return found


def _container(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    container: dict[str, Any] = _workload(objs, kind)["spec"]["template"]["spec"]["containers"][0]
    return container


def _operator_args(objs: list[dict[str, Any]]) -> Any:
    args = _container(objs, "Deployment")["args"]
    assert args[0] == "operator"
    return operator_main.parse_args(args[1:])


def _sidecar_args(objs: list[dict[str, Any]]) -> Any:
    args = _container(objs, "DaemonSet")["args"]
    assert args[0] == "sidecar"
    parsed = sidecar_flags.parse_args(args[1:])
    sidecar_flags.check_transport(parsed)  # what the sidecar refuses at start (exit 2)
    return parsed


def _tls_secret(objs: list[dict[str, Any]], kind: str) -> str:
    """The Secret mounted where the container's --tls-* files are; checks the files are under it."""
    pod = _workload(objs, kind)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    files = [
        a.split("=", 1)[1]
        for a in container["args"]
        if a.startswith(("--tls-cert=", "--tls-key=", "--tls-ca="))
    ]
    assert sorted(pathlib.PurePath(f).name for f in files) == ["ca.crt", "tls.crt", "tls.key"]
    assert {str(pathlib.PurePath(f).parent) for f in files} == {mount["mountPath"]}
    [volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
    # Secret files are root-owned 0440: only the pod's fsGroup makes them readable to the non-root user.
    assert volume["secret"]["defaultMode"] == 0o440
    context = pod["securityContext"]
    assert context["fsGroup"] == context["runAsGroup"] and context["runAsUser"] != 0
    secret: str = volume["secret"]["secretName"]
    return secret


def _names(certificate: dict[str, Any]) -> list[str]:
    """The names the sidecar sees in a certificate: its CN and every SAN (ghostserve.sidecar.rpc)."""
    spec = certificate["spec"]
    return [spec["commonName"], *spec.get("dnsNames", [])]


def _certificates(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Certificates by the Secret they fill."""
    return {o["spec"]["secretName"]: o for o in objs if o["kind"] == "Certificate"}


def _assert_identities_meet(objs: list[dict[str, Any]]) -> None:
    """Each side's certificate names what the other side pins, and nothing more."""
    operator, sidecar = _operator_args(objs), _sidecar_args(objs)
    assert not sidecar.insecure and not sidecar.tls_no_client_auth and sidecar.tls_ca
    policy = sidecar_flags.policy_from(sidecar)
    certs = _certificates(objs)
    operator_cert = certs[_tls_secret(objs, "Deployment")]
    sidecar_cert = certs[_tls_secret(objs, "DaemonSet")]
    as_operator = policy.tcp(_names(operator_cert))
    assert as_operator.operator and not as_operator.peer
    as_peer = policy.tcp(_names(sidecar_cert))  # a sidecar dialing another to move a group
    assert as_peer.peer and not as_peer.operator
    # The operator dials node IPs and checks the one name every sidecar's certificate carries.
    assert operator.tls_server_name in sidecar_cert["spec"]["dnsNames"]
    assert {"server auth", "client auth"} <= set(sidecar_cert["spec"]["usages"])
    assert "client auth" in operator_cert["spec"]["usages"]
    assert "server auth" not in operator_cert["spec"]["usages"]
    assert operator_cert["spec"]["issuerRef"] == sidecar_cert["spec"]["issuerRef"]  # one CA: one ca.crt
    # Control: another certificate of the same CA is refused, so the checks above can fail.
    rogue = policy.tcp(["ghostserve-engine"])
    assert not (rogue.operator or rogue.peer or rogue.allowed)
    assert isinstance(rogue, authz.Caller)


def test_default_is_mutual_tls_with_cert_manager(render_script: ModuleType) -> None:
    objs = _render(render_script)
    _assert_identities_meet(objs)
    sidecar = _sidecar_args(objs)
    assert (sidecar.operator_identity, sidecar.peer_identity) == (
        ["ghostserve-operator"],
        ["ghostserve-sidecar"],
    )
    assert sidecar.tls_allow_client == []
    # The release's own CA: self-signed Issuer -> CA Certificate -> CA Issuer -> the two certificates.
    issuers = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "Issuer"}
    assert issuers == {
        "ghostserve-selfsigned": {"selfSigned": {}},
        "ghostserve-ca": {"ca": {"secretName": "ghostserve-ca"}},
    }
    certs = _certificates(objs)
    ca = certs["ghostserve-ca"]["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == "ghostserve-selfsigned"
    leaves = [c["spec"] for name, c in certs.items() if name != "ghostserve-ca"]
    assert len(leaves) == 2 and all(
        s["issuerRef"]["name"] == "ghostserve-ca" and not s.get("isCA") for s in leaves
    )
    assert all(certmanager_shape.problems(o) == [] for o in objs if o["kind"] in certmanager_shape.KINDS)
    assert "WARNING" not in _notes(None)


def test_renamed_identities_flow_to_certificates_and_flags(render_script: ModuleType) -> None:
    values = {"tls": {"sidecarServerName": "kv.sidecar.example", "operatorClientName": "kv-operator.example",
                      "operatorSecretName": "op-cert", "sidecarSecretName": "sc-cert"}}  # fmt: skip
    objs = _render(render_script, values)
    _assert_identities_meet(objs)
    assert _sidecar_args(objs).operator_identity == ["kv-operator.example"]
    assert _operator_args(objs).tls_server_name == "kv.sidecar.example"


def test_your_own_issuer_signs_both_certificates(render_script: ModuleType) -> None:
    issuer = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    objs = _render(render_script, {"tls": {"certManager": {"issuerRef": issuer}}})
    _assert_identities_meet(objs)
    assert not [o for o in objs if o["kind"] == "Issuer"]
    assert [c["spec"]["issuerRef"] for c in _certificates(objs).values()] == [issuer, issuer]


def test_secret_mode_mounts_your_secrets_and_creates_no_certificates(render_script: ModuleType) -> None:
    objs = _render(render_script, {"tls": {"mode": "secret", "sidecarSecretName": "mine-sc"}})
    assert not [o for o in objs if o["kind"] in certmanager_shape.KINDS]
    assert _tls_secret(objs, "DaemonSet") == "mine-sc"
    assert _tls_secret(objs, "Deployment") == "ghostserve-operator-tls"
    sidecar, operator = _sidecar_args(objs), _operator_args(objs)
    assert not sidecar.insecure and sidecar.tls_ca and operator.tls_ca
    assert sidecar_flags.policy_from(sidecar).tcp(["ghostserve-operator"]).operator
    notes = _notes({"tls": {"mode": "secret"}})
    assert "WARNING" not in notes and "ghostserve-sidecar-tls (naming ghostserve-sidecar)" in notes


def test_insecure_mode_is_plaintext_with_a_warning(render_script: ModuleType) -> None:
    values = {"tls": {"mode": "insecure"}}
    objs = _render(render_script, values)
    sidecar, operator = _sidecar_args(objs), _operator_args(objs)
    assert sidecar.insecure and not (sidecar.tls_cert or sidecar.tls_ca)
    assert not (operator.tls_ca or operator.tls_cert or operator.tls_key or operator.tls_server_name)
    assert sidecar_flags.policy_from(sidecar).tcp(None).operator  # what --insecure means
    assert not [o for o in objs if o["kind"] in certmanager_shape.KINDS]
    for kind in ("Deployment", "DaemonSet"):
        pod = _workload(objs, kind)["spec"]["template"]["spec"]
        assert "tls" not in {v["name"] for v in pod["volumes"]}
    notes = _notes(values)
    assert "WARNING: tls.mode is insecure" in notes and "--insecure" in notes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"tls": {"mode": "plaintext"}},
            "at '/tls/mode': value must be one of 'cert-manager', 'secret', 'insecure'",
        ),
        ({"tls": {"mode": None}}, "at '/tls': missing property 'mode'"),  # null unsets: no silent default
        ({"tls": {"sidecarServerName": "Not A Name"}}, "at '/tls/sidecarServerName'"),
        ({"tls": {"certManager": {"duration": "90 days"}}}, "at '/tls/certManager/duration'"),
        ({"tls": {"certManager": {"issuerRef": {"nme": "x"}}}}, "at '/tls/certManager/issuerRef'"),
    ],
)
def test_bad_tls_values_fail_the_schema(
    render_script: ModuleType, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        render_script.render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"enabled": True}}, "tls.enabled and tls.certManager.enabled were replaced by tls.mode"),
        ({"tls": {"certManager": {"enabled": False}}}, "were replaced by tls.mode"),
        ({"tls": {"operatorClientName": "ghostserve-sidecar"}},
         'tls.sidecarServerName and tls.operatorClientName are both "ghostserve-sidecar"'),
        ({"tls": {"mode": "secret", "operatorSecretName": "one", "sidecarSecretName": "one"}},
         'tls.sidecarSecretName and tls.operatorSecretName are both "one"'),
        ({"tls": {"certManager": {"issuerRef": {"kind": "ClusterIssuer"}}}},
         "tls.certManager.issuerRef needs a name"),
    ],
)  # fmt: skip
def test_unsafe_or_stale_tls_values_fail_the_render(
    render_script: ModuleType, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render_script.render(values)


def test_unknown_mode_fails_in_the_templates_without_the_schema(
    render_script: ModuleType, tmp_path: pathlib.Path
) -> None:
    """A render that skips values.schema.json still never falls back to plaintext or a guess."""
    chart = tmp_path / "ghostserve"
    shutil.copytree(chart_support.CHART, chart)
    (chart / "values.schema.json").unlink()
    with pytest.raises(
        helm_python.HelmRenderError, match=re.escape(f'tls.mode "plaintext" is not a mode: {MODE_MESSAGE}')
    ):
        render_script.render({"tls": {"mode": "plaintext"}}, chart=chart)
    with pytest.raises(helm_python.HelmRenderError, match=re.escape("tls.mode")):
        _notes({"tls": {"mode": "Insecure"}}, chart)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda o: o["spec"].pop("secretName"), "spec.secretName is required"),
        (lambda o: o["spec"]["issuerRef"].pop("name"), "spec.issuerRef.name is required"),
        (lambda o: o["spec"].update(dnsName=["x"]), "spec.dnsName: unknown field"),
        (lambda o: o["spec"].update(duration="1 year"), "is not a Go duration"),
        (lambda o: o["spec"]["privateKey"].update(size=2048), "not valid for ECDSA"),
        (lambda o: o["spec"]["usages"].append("server-auth"), "unknown usages ['server-auth']"),
        (lambda o: [o["spec"].pop(k) for k in ("commonName", "dnsNames")], "at least one of commonName"),
    ],
)
def test_the_structural_check_catches_broken_certificates(
    default_objects: list[dict[str, Any]], change: Any, problem: str
) -> None:
    """Control: certmanager_shape really rejects what cert-manager would, so its passes mean something."""
    [cert] = [
        o
        for o in default_objects
        if o["kind"] == "Certificate" and o["metadata"]["name"].endswith("-sidecar")
    ]
    broken = copy.deepcopy(cert)
    change(broken)
    assert any(problem in p for p in certmanager_shape.problems(broken)), certmanager_shape.problems(broken)


def test_the_structural_check_catches_broken_issuers(default_objects: list[dict[str, Any]]) -> None:
    ca = next(o for o in default_objects if o["kind"] == "Issuer" and "ca" in o["spec"])
    both = copy.deepcopy(ca)
    both["spec"]["selfSigned"] = {}
    assert any("exactly one of" in p for p in certmanager_shape.problems(both))
    no_secret = copy.deepcopy(ca)
    no_secret["spec"]["ca"] = {}
    assert certmanager_shape.problems(no_secret) == ["spec.ca.secretName is required"]
