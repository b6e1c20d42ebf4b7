"""Regenerate the Python code of protos/ghostserve/v1/*.proto (pb2, pb2_grpc and .pyi stubs).

Usage: python scripts/gen_protos.py [--out DIR]   (default: in place, beside the .proto files)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted((PROTO_ROOT / "ghostserve" / "v1").glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in protos:
        rel = proto.relative_to(PROTO_ROOT)
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(rel),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {rel} (exit {rc})")
    return protos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=PROTO_ROOT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    generate(args.out)
    if args.out == PROTO_ROOT:
        # The typed client methods follow the service (scripts/gen_client.py).
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_client.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
