"""The `rnnserve` command line: serve, train, export (also `python -m serving`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve", description="Train, export and serve LSTM/GRU models.")
    subparsers = parser.add_subparsers(dest="command", required=True)

    serve = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC",
        description="Serve a model repository over gRPC (typed API, KServe v2, health, reflection). Every "
        "setting also reads from its RNNSERVE_* environment variable; a flag wins over the environment.",
    )
    from serving.settings import ServerSettings

    for name, info in ServerSettings.model_fields.items():
        default = info.default
        shown = f"{default / 2**20:g} MiB" if name.endswith("_bytes") else default
        serve.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=type(default) if default is not None else str,
            metavar=name.upper(), help=f"{info.description} (default {shown}; env RNNSERVE_{name.upper()})",
        )
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="TOML file of settings (same names as the flags, with underscores); "
                       "environment variables override it, flags override both")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="text, or one JSON object per line for log collectors (default text)")
    serve.set_defaults(handler=_serve)

    try:
        from training.cli import add_subcommands
    except ImportError:  # the serving image ships without the training package
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(subparsers)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serving.errors import ModelLoadError
    from serving.grpc.server import serve
    from serving.settings import ServerSettings

    flags = {name: getattr(args, name) for name in ServerSettings.model_fields if getattr(args, name) is not None}
    configure_logging(args.log_level.upper(), "%(asctime)s %(levelname)s %(name)s: %(message)s",
                      json_lines=args.log_format == "json")
    try:
        from_file = _config_file(args.config) if args.config else {}
    except (OSError, ValueError) as error:
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return 2
    try:
        settings = ServerSettings(**{**from_file, **flags})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    try:
        settings.bearer_token()
        settings.server_credentials()
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return serve(settings)
    except (ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _config_file(path: Path) -> dict:
    """Settings from a TOML file, minus those an RNNSERVE_* environment variable sets."""
    import os
    import tomllib

    from serving.settings import ServerSettings

    with open(path, "rb") as handle:
        values = tomllib.load(handle)
    unknown = sorted(set(values) - set(ServerSettings.model_fields))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {', '.join(ServerSettings.model_fields)}")
    return {key: value for key, value in values.items() if f"RNNSERVE_{key.upper()}" not in os.environ}


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str | int, fmt: str, json_lines: bool = False) -> None:
    logging.basicConfig(level=level, format=fmt)
    if json_lines:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JsonLines())
    # The ONNX graph optimiser reports every rewrite at INFO.
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        configure_logging(logging.INFO, "%(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
