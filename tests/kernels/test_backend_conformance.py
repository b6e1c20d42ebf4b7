"""Every backend conforms to the Backend Protocol, and `import ghostserve.kernels` stays light."""

from __future__ import annotations

import inspect
import subprocess
import sys

from ghostserve.kernels import backend as backend_mod
from ghostserve.kernels import codec as codec_mod

PROTOCOL_METHODS = ["as_bytes", "device", "empty", "xor", "gf_combine", "equal", "gather"]


def test_backend_conforms_to_protocol(backend: str) -> None:
    be = codec_mod.make_backend(backend)
    assert isinstance(be.name, str) and be.rdp_chunk_bytes > 0 and be.gather_block_bytes > 0
    for name in PROTOCOL_METHODS:
        want = inspect.signature(getattr(backend_mod.Backend, name))
        got = inspect.signature(getattr(type(be), name))
        assert list(got.parameters) == list(want.parameters), f"{type(be).__name__}.{name}{got} != {want}"
        kinds = [p.kind for p in got.parameters.values()]
        assert kinds == [p.kind for p in want.parameters.values()], name


def test_import_is_light() -> None:
    code = (
        "import sys, ghostserve.kernels as k; k.Codec('rs', 4, 2); "
        "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
