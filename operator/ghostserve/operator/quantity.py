"""Kubernetes resource quantities ("8", "500m", "64Gi", "1e3") parsed exactly, as the API server does.

Pure functions. The operator compares quantities (request above limit) and turns the parity budget into
bytes for the sidecar; both must agree with the API server, which would otherwise reject the pod.
"""

from __future__ import annotations

import fractions
import re

# The API server's grammar (k8s.io/apimachinery/pkg/api/resource): a signed decimal number, then a binary
# suffix (Ki..Ei), a decimal SI suffix (n u m "" k M G T P E) or a decimal exponent (e3, E-2).
_GRAMMAR = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": fractions.Fraction(1, 10**9),
    "u": fractions.Fraction(1, 10**6),
    "m": fractions.Fraction(1, 1000),
    "": fractions.Fraction(1),
    "k": fractions.Fraction(10**3),
    "M": fractions.Fraction(10**6),
    "G": fractions.Fraction(10**9),
    "T": fractions.Fraction(10**12),
    "P": fractions.Fraction(10**15),
    "E": fractions.Fraction(10**18),
}
MAX_LENGTH = 64  # longer strings are not quantities a person writes; also keeps parsing cheap
MAX_EXPONENT = 30  # 1e999999 would make Fraction build an enormous integer


class QuantityError(ValueError):
    """Not a Kubernetes quantity."""


def parse(value: object) -> fractions.Fraction:
    """The exact value of a quantity given as a string or an int (YAML `8` arrives as an int)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise QuantityError(f"{value!r} is not a quantity (a string like '8', '500m' or '64Gi')")
    text = str(value)
    match = _GRAMMAR.match(text) if len(text) <= MAX_LENGTH else None
    if match is None:
        raise QuantityError(f"{text!r} is not a quantity (e.g. '8', '500m', '64Gi', '1e3')")
    number, suffix = fractions.Fraction(match.group(1)), match.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    exponent = int(suffix[1:])
    if abs(exponent) > MAX_EXPONENT:
        raise QuantityError(f"{text!r}: exponent out of range (|e| <= {MAX_EXPONENT})")
    return number * fractions.Fraction(10) ** exponent


def to_bytes(value: object) -> int:
    """A memory quantity in whole bytes, rounded up (as the API server rounds memory)."""
    exact = parse(value)
    if exact < 0:
        raise QuantityError(f"{value!r} is negative")
    return -((-exact.numerator) // exact.denominator)
