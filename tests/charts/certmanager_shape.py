"""Offline structural checks of the cert-manager objects the chart renders (cert-manager.io/v1 Issuer
and Certificate).

kubernetes-validate ships schemas of the built-in kinds only, and the cert-manager CRDs are not
vendored here (no network in the tests), so these kinds are not schema-validated. Instead this checks
what cert-manager's CRD schema and admission webhook require of the fields the chart uses: required
fields present and typed, known fields only, enums (key algorithm, usages, rotation policy) and the
duration grammar, and exactly one issuer type per Issuer. `problems()` returns a list of messages;
an empty list means the object passed.
"""

from __future__ import annotations

import re
from typing import Any

KINDS = frozenset({"Issuer", "ClusterIssuer", "Certificate"})
API_VERSION = "cert-manager.io/v1"

_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|ns))+$")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Certificate.spec fields of cert-manager v1 (the CRD's properties).
_CERT_FIELDS = {
    "additionalOutputFormats", "commonName", "dnsNames", "duration", "emailAddresses",
    "encodeUsagesInRequest", "ipAddresses", "isCA", "issuerRef", "keystores", "literalSubject",
    "nameConstraints", "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "secretName", "secretTemplate", "signatureAlgorithm", "subject", "uris",
    "usages",
}  # fmt: skip
_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
}  # fmt: skip
_KEY_SIZES: dict[str, set[int | None]] = {
    "RSA": {2048, 3072, 4096, 8192},
    "ECDSA": {256, 384, 521},
    "Ed25519": {None},
}
_ISSUER_TYPES = {"acme", "ca", "selfSigned", "vault", "venafi"}


def problems(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one rendered cert-manager object ([] = nothing)."""
    out: list[str] = []
    kind = obj.get("kind")
    if obj.get("apiVersion") != API_VERSION:
        out.append(f"apiVersion {obj.get('apiVersion')!r}, expected {API_VERSION}")
    meta = obj.get("metadata") or {}
    if not isinstance(meta.get("name"), str) or not _DNS.match(meta["name"]) or len(meta["name"]) > 253:
        out.append(f"metadata.name {meta.get('name')!r} is not a DNS subdomain")
    if set(obj) - {"apiVersion", "kind", "metadata", "spec"}:
        out.append(
            f"unknown top-level fields {sorted(set(obj) - {'apiVersion', 'kind', 'metadata', 'spec'})}"
        )
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [*out, "spec must be an object"]
    if kind == "Certificate":
        out += _certificate(spec)
    elif kind in ("Issuer", "ClusterIssuer"):
        out += _issuer(spec)
    else:
        out.append(f"kind {kind!r} is not a cert-manager kind this checker knows")
    return out


def _certificate(spec: dict[str, Any]) -> list[str]:
    out = [f"spec.{k}: unknown field" for k in sorted(set(spec) - _CERT_FIELDS)]
    if not isinstance(spec.get("secretName"), str) or not _DNS.match(spec["secretName"]):
        out.append("spec.secretName is required (a Secret name)")
    out += _issuer_ref(spec.get("issuerRef"))
    names = [spec.get(k) for k in ("commonName", "dnsNames", "uris", "emailAddresses", "ipAddresses")]
    if not any(names) and not spec.get("literalSubject"):
        out.append("at least one of commonName, dnsNames, uris, emailAddresses, ipAddresses is required")
    if "commonName" in spec and (not isinstance(spec["commonName"], str) or len(spec["commonName"]) > 64):
        out.append("spec.commonName must be a string of at most 64 characters")
    dns_names = spec.get("dnsNames", [])
    if not isinstance(dns_names, list) or not all(isinstance(n, str) and _DNS.match(n) for n in dns_names):
        out.append(f"spec.dnsNames must be a list of DNS names, got {dns_names!r}")
    for key in ("duration", "renewBefore"):
        if key in spec and not (isinstance(spec[key], str) and _DURATION.match(spec[key])):
            out.append(f"spec.{key} {spec[key]!r} is not a Go duration")
    if "isCA" in spec and not isinstance(spec["isCA"], bool):
        out.append("spec.isCA must be a boolean")
    usages = spec.get("usages", [])
    if not isinstance(usages, list) or not set(usages) <= _USAGES:
        out.append(f"spec.usages has unknown usages {sorted(set(usages) - _USAGES)}")
    out += _private_key(spec.get("privateKey", {}))
    return out


def _private_key(key: Any) -> list[str]:
    if not isinstance(key, dict):
        return ["spec.privateKey must be an object"]
    known = {"algorithm", "encoding", "rotationPolicy", "size"}
    out = [f"spec.privateKey.{k}: unknown field" for k in sorted(set(key) - known)]
    algorithm = key.get("algorithm", "RSA")
    if algorithm not in _KEY_SIZES:
        out.append(f"spec.privateKey.algorithm {algorithm!r}: one of {sorted(_KEY_SIZES)}")
    elif "size" in key and key["size"] not in _KEY_SIZES[algorithm]:
        out.append(f"spec.privateKey.size {key['size']!r} is not valid for {algorithm}")
    if key.get("rotationPolicy", "Never") not in ("Never", "Always"):
        out.append(f"spec.privateKey.rotationPolicy {key['rotationPolicy']!r}: Never or Always")
    return out


def _issuer_ref(ref: Any) -> list[str]:
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref["name"]:
        return ["spec.issuerRef.name is required"]
    out = [f"spec.issuerRef.{k}: unknown field" for k in sorted(set(ref) - {"name", "kind", "group"})]
    return out + [f"spec.issuerRef.{k} must be a string" for k in ("kind", "group")
                  if k in ref and not isinstance(ref[k], str)]  # fmt: skip


def _issuer(spec: dict[str, Any]) -> list[str]:
    types = set(spec) & _ISSUER_TYPES
    out = [f"spec.{k}: unknown field" for k in sorted(set(spec) - _ISSUER_TYPES)]
    if len(types) != 1:
        out.append(f"an Issuer needs exactly one of {sorted(_ISSUER_TYPES)}, got {sorted(types)}")
    if "selfSigned" in spec and not isinstance(spec["selfSigned"], dict):
        out.append("spec.selfSigned must be an object")
    if "ca" in spec:
        ca = spec["ca"]
        if not isinstance(ca, dict) or not isinstance(ca.get("secretName"), str) or not ca["secretName"]:
            out.append("spec.ca.secretName is required")
    return out
