"""Which sglang releases the plugin knows, and the refusal for any other.

Every hook target is a private or semi-private sglang name (see docs/sglang.md); a release that moved
one would make the plugin fail in the middle of serving. Refusing at load time is the safe default.
"""

from __future__ import annotations

import importlib.metadata

# Releases whose hook targets were read and tested (tests/sglang): add one only after doing both.
SUPPORTED_VERSIONS = frozenset({"0.5.23"})


class UnsupportedSGLangError(RuntimeError):
    """The installed sglang is not a release the plugin was written and tested against."""


def installed_version() -> str | None:
    """The installed sglang distribution's version, or None when sglang is not installed."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(version: str | None) -> str:
    """Return `version` if supported; raise UnsupportedSGLangError naming the supported ones otherwise."""
    supported = ", ".join(sorted(SUPPORTED_VERSIONS))
    if version is None:
        raise UnsupportedSGLangError(
            f"sglang is not installed; GhostServe's plugin supports sglang {supported}"
        )
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedSGLangError(
            f"sglang {version} is not supported by GhostServe's plugin (supported: {supported}); "
            "its hook targets were not verified on this release. Install a supported sglang or unset "
            "GHOSTSERVE_SGLANG (or leave 'ghostserve' out of SGLANG_PLUGINS) to serve without protection."
        )
    return version
