"""What `ghostserve serve` runs, from sglang-style flags and the environment (pure: no I/O).

The operator starts every engine pod with sglang's flags (`--model-path M --tp-size TP --host H
--port P --page-size S [user args]`) and the GHOSTSERVE_* variables the sglang plugin reads; the
reference engine takes the same, so one pod spec serves either engine. Flags it has no use for are
ignored with a warning (as a list), never an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from collections.abc import Mapping, Sequence

from ghostserve.engine import adapter
from ghostserve.engine.reference import config as config_mod
from ghostserve.engine.reference import devices

# Importing the plugin's settings module loads no sglang (the package's __init__ is a docstring).
from ghostserve.engine.sglang import settings as settings_mod

MODEL_PREFIX = "ghostserve/tiny-llama"
# --model-path ghostserve/tiny-llama[-<variant>]: the reference engine's seeded random-weight models.
MODELS: dict[str, config_mod.ModelConfig] = {
    "": config_mod.ModelConfig(),
    "demo": config_mod.ModelConfig(
        vocab=1024, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, ffn=512
    ),
}
RESUME_WAIT_ENV = "GHOSTSERVE_RESUME_WAIT_S"
WORKDIR_ENV = "GHOSTSERVE_WORKDIR"


class ServeArgsError(ValueError):
    """A flag or variable the reference engine cannot serve with; the message names it."""


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_path: str
    model: config_mod.ModelConfig
    tp: int
    host: str
    port: int
    page_size: int
    pool_slots: int
    sidecar: str
    group: str
    protection: adapter.Protection
    rpc_timeout: float
    # Held requests (in the sidecar's ledger, waiting for the client to resubmit) are released after this.
    resume_wait_s: float
    workdir: pathlib.Path | None  # gloo store files; None: a fresh private directory per process
    devices: tuple[devices.Device, ...]
    pod_name: str = ""
    node_name: str = ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ghostserve serve",
        description="Serve the reference engine over HTTP with sglang's request shapes.",
    )
    p.add_argument("--model-path", default=MODEL_PREFIX, help=f"{MODEL_PREFIX}[-demo]")
    p.add_argument("--tp-size", "--tp", dest="tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--page-size", type=int, default=16, help="KV page size (tokens)")
    p.add_argument("--max-total-tokens", type=int, default=16384, help="KV pool slots per rank")
    return p


def parse(argv: Sequence[str], env: Mapping[str, str]) -> tuple[ServeConfig, list[str]]:
    """(config, ignored flags). Raises ServeArgsError naming the first bad flag or variable."""
    args, unknown = _parser().parse_known_args(list(argv))
    model = model_config(args.model_path)
    try:
        settings = settings_mod.PluginSettings.from_env(env)
    except settings_mod.SettingsError as exc:
        raise ServeArgsError(str(exc)) from exc
    try:
        model.check_tp(args.tp)
    except config_mod.ConfigError as exc:
        raise ServeArgsError(f"--tp-size {args.tp}: {exc}") from exc
    if settings.world_size is not None and settings.world_size != args.tp:
        raise ServeArgsError(f"GHOSTSERVE_WORLD_SIZE={settings.world_size} but --tp-size {args.tp}")
    if args.page_size <= 0 or settings.protection.chunk_tokens % args.page_size:
        raise ServeArgsError(
            f"GHOSTSERVE_CHUNK_TOKENS={settings.protection.chunk_tokens} must be a multiple of "
            f"--page-size {args.page_size}"
        )
    if args.max_total_tokens < args.page_size:
        raise ServeArgsError(f"--max-total-tokens {args.max_total_tokens} is below one page")
    if not 0 < args.port < 65536:
        raise ServeArgsError(f"--port must be in 1..65535, got {args.port}")
    wait_text = env.get(RESUME_WAIT_ENV, "120").strip()
    try:
        resume_wait = float(wait_text)
    except ValueError as exc:
        raise ServeArgsError(f"{RESUME_WAIT_ENV} must be a number of seconds, got {wait_text!r}") from exc
    if not resume_wait >= 0:
        raise ServeArgsError(f"{RESUME_WAIT_ENV} must be >= 0, got {wait_text!r}")
    uuids = devices.visible_uuids(env)
    if uuids and len(uuids) < args.tp:
        raise ServeArgsError(f"NVIDIA_VISIBLE_DEVICES lists {len(uuids)} GPU(s) for --tp-size {args.tp}")
    workdir = env.get(WORKDIR_ENV, "").strip()
    slots = args.max_total_tokens // args.page_size * args.page_size
    cfg = ServeConfig(
        model_path=args.model_path,
        model=model,
        tp=args.tp,
        host=args.host,
        port=args.port,
        page_size=args.page_size,
        pool_slots=slots,
        sidecar=settings.sidecar,
        group=settings.group,
        protection=settings.protection,
        rpc_timeout=settings.rpc_timeout,
        resume_wait_s=resume_wait,
        workdir=pathlib.Path(workdir) if workdir else None,
        devices=tuple(devices.Device.for_rank(r, env) for r in range(args.tp)),
        pod_name=env.get("GHOSTSERVE_POD_NAME", ""),
        node_name=env.get("GHOSTSERVE_NODE_NAME", ""),
    )
    return cfg, list(unknown)


def model_config(path: str) -> config_mod.ModelConfig:
    """The reference model named by ``--model-path``. Raises ServeArgsError for any other model."""
    if path == MODEL_PREFIX or path.startswith(MODEL_PREFIX + "-"):
        variant = path[len(MODEL_PREFIX) + 1 :]
        if variant in MODELS:
            return MODELS[variant]
    names = ", ".join(MODEL_PREFIX + (f"-{v}" if v else "") for v in MODELS)
    raise ServeArgsError(
        f"the reference engine serves only its own random-weight models ({names}), got {path!r}"
    )
