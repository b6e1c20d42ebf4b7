"""The chart's sidecar DaemonSet always renders flags the sidecar accepts: `--insecure` without TLS
(the sidecar refuses plaintext TCP otherwise), pinned identities with TLS, and (the default)
cert-manager certificates naming exactly those identities."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from ghostserve.sidecar import flags

from tests.charts import chart_support


def rendered(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    pytest.importorskip("helm_python")
    module = chart_support.load_render_script()
    return [d for _, text in module.render(values) for d in yaml.safe_load_all(text) if d]


def sidecar_args(docs: list[dict[str, Any]]) -> list[str]:
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    container = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "sidecar")
    return [a for a in container["args"][1:] if "$(" not in a]


def test_without_tls_the_sidecar_is_told_it_is_insecure() -> None:
    args = flags.parse_args(sidecar_args(rendered({"tls": {"mode": "insecure"}})))
    assert args.listen and args.insecure and not args.tls_cert
    flags.check_transport(args)  # would raise (exit 2) without --insecure


def test_with_cert_manager_the_certificates_name_the_pinned_identities() -> None:
    docs = rendered(None)  # the default: tls.mode cert-manager
    args = flags.parse_args(sidecar_args(docs))
    flags.check_transport(args)
    assert not args.insecure and args.tls_ca
    certs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    policy = flags.policy_from(args)
    operator = next(c for n, c in certs.items() if n.endswith("-operator"))
    sidecar = next(c for n, c in certs.items() if n.endswith("-sidecar"))
    assert policy.tcp([operator["commonName"], *operator["dnsNames"]]).operator
    assert policy.tcp([sidecar["commonName"], *sidecar["dnsNames"]]).peer
    assert "client auth" in sidecar["usages"] and "server auth" in sidecar["usages"]
    assert any(c.get("isCA") for c in certs.values())
