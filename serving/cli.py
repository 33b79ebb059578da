"""The `rnnserve` command line: serve, train, export (also `python -m serving`)."""

from __future__ import annotations

import argparse
import functools
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
        default = info.get_default(call_default_factory=True)
        shown = f"{default / 2**20:g} MiB" if name.endswith("_bytes") else default
        if isinstance(default, dict):
            kind, shown = _json_object, "none"
        else:
            kind = _flag_bool if isinstance(default, bool) else type(default) if default is not None else str
        serve.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind,
            metavar=name.upper(), help=f"{info.description} (default {shown}; env RNNSERVE_{name.upper()})",
        )
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="TOML file of settings (same names as the flags, with underscores); "
                       "environment variables override it, flags override both")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="text, or one JSON object per line for log collectors (default text)")
    serve.set_defaults(handler=_serve)

    _add_score(subparsers)

    health = subparsers.add_parser(
        "health", help="ask a server's grpc.health.v1 service; exit 0 when SERVING (container health checks)",
    )
    health.add_argument("--target", help="HOST:PORT (default 127.0.0.1 and RNNSERVE_PORT, else 50051)")
    health.add_argument("--service", default="", help="a service or model name (default: the whole server)")
    health.add_argument("--timeout-s", type=float, default=3.0)
    health.add_argument("--tls-ca-file", type=Path, help="PEM CA bundle when the server serves TLS")
    health.add_argument("--tls-cert-file", type=Path, help="client certificate when the server asks for one (mTLS)")
    health.add_argument("--tls-key-file", type=Path, help="private key of --tls-cert-file")
    health.set_defaults(handler=_health)

    bench = subparsers.add_parser(
        "bench", help="run the benchmarks side by side and write BENCHMARKS.md (a source checkout; `make bench`)",
        description="Runs benchmarks/*.py in one go on this machine (runtime, scoring, streams, stream_load, "
        "unary, footprint, peers, servers; the peers' venvs and h2load are set up first), then benchmarks/report.py, "
        "which writes BENCHMARKS.md, benchmarks/plots/ and the README's headline from benchmarks/results/.",
    )
    bench.add_argument("--only", default=",".join(BENCHMARKS), metavar="LIST",
                       help=f"comma-separated subset of {','.join(BENCHMARKS)} (default all)")
    bench.set_defaults(handler=_bench)

    try:
        from training.cli import add_subcommands
    except ImportError:  # the serving image ships without the training package
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(subparsers)
    return parser


def _add_score(subparsers) -> None:
    from serving.scoring.cli import __doc__ as cli_doc
    from serving.scoring.run import __doc__ as run_doc

    score = subparsers.add_parser(
        "score", help="score files with a model: in-process, against a server, or on Ray",
        description="Score every row of a file (or every audio file of a folder or glob) with one model and "
        "write one result row per input.\n\n" + run_doc.split("\n\n", 1)[1] + "\n" + cli_doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--model", required=True, help="model name")
    score.add_argument("--input", required=True, metavar="PATH",
                       help="txt (one text per line), csv, tsv, jsonl, parquet, a folder or glob of WAV/FLAC/OGG "
                       "files, or - for stdin (txt unless --input-format says otherwise)")
    score.add_argument("--output", required=True, metavar="PATH", help="jsonl, csv or parquet file, or - for stdout")
    score.add_argument("--models", type=Path, default=Path("models"), help="model repository (default models/)")
    score.add_argument("--version", default="", help="model version (default the latest)")
    score.add_argument("--server", metavar="HOST:PORT", help="score on a running server instead of in-process")
    score.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local (this process or --server) or ray (Ray Data actors; needs rnnserve[ray])")
    score.add_argument("--ray-address", help=(
        "an existing Ray cluster, e.g. ray://head:10001; its network exposure is that cluster's own "
        "configuration (default: a local Ray that listens on 127.0.0.1 only)"))
    score.add_argument("--input-format", choices=["txt", "csv", "tsv", "jsonl", "parquet", "audio"],
                       help="default: from the file name")
    score.add_argument("--format", dest="output_format", choices=["jsonl", "csv", "parquet"],
                       help="output format (default: from the file name; jsonl for stdout)")
    score.add_argument("--text-column", "--field", dest="text_column", default="text",
                       help="column (csv/tsv/parquet) or field (jsonl) holding the text (default text)")
    score.add_argument("--id-column", help="column or field with row ids (default: the row number)")
    score.add_argument("--probabilities", action="store_true", help="also write every label's probability")
    score.add_argument("--batch-size", type=int, default=256, help="rows per model call (default 256)")
    score.add_argument("--concurrency", type=int, default=0,
                       help="batches in flight: default 1 in-process, 4 against a server; "
                       "Ray actors: the cluster's CPUs - 1")
    score.add_argument("--timeout-s", type=float, default=60.0, help="--server: deadline per call (default 60)")
    score.add_argument("--retries", type=int, default=5,
                       help="--server: retries with backoff on UNAVAILABLE / RESOURCE_EXHAUSTED (default 5)")
    score.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                       help="a bad row stops the run (default) or is skipped and written to the rejects file")
    score.add_argument("--rejects", metavar="PATH", help="rejects file for --on-error skip "
                       "(default OUTPUT.rejects.jsonl)")
    score.add_argument("--token", help="--server: bearer token")
    score.add_argument("--token-file", type=Path, help="--server: read the bearer token from this file")
    score.add_argument("--tls-ca-file", type=Path, help="--server: PEM CA bundle; turns on TLS")
    score.add_argument("--tls-cert-file", type=Path, help="--server: client certificate (mutual TLS)")
    score.add_argument("--tls-key-file", type=Path, help="--server: client key (mutual TLS)")
    score.add_argument("--device", default="cpu", help="in-process: auto, cpu or cuda[:N] (default cpu)")
    score.add_argument("--quiet", action="store_true", help="no progress bar even on a terminal")
    score.set_defaults(handler=_score)


BENCHMARKS = ("runtime", "scoring", "streams", "stream_load", "unary", "footprint", "peers", "servers")


def _bench(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import time

    root = Path(__file__).resolve().parent.parent
    folder = root / "benchmarks"
    if not (folder / "report.py").exists():
        print("rnnserve bench needs a source checkout: benchmarks/ beside serving/", file=sys.stderr)
        return 2
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        print(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    (folder / "results").mkdir(exist_ok=True)
    # `make bench` passes its own start so the peers' set-up and the image build count too.
    (folder / "results" / "started_at").write_text(os.environ.get("RNNSERVE_BENCH_STARTED", str(int(time.time()))))
    # The peers' venvs and h2load, which the server-side benchmark drives.
    steps = [["bash", str(folder / "setup_peers.sh")]] if {"peers", "servers"} & set(chosen) else []
    steps += [[sys.executable, str(folder / f"{name}.py")] for name in BENCHMARKS if name in chosen]
    environment = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    for command in [*steps, None]:
        if command is None:  # every measurement done: the report reads when the run ended
            (folder / "results" / "finished_at").write_text(str(int(time.time())))
            command = [sys.executable, str(folder / "report.py")]
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(Path(part).name if '/' in part else part for part in command)}",
              flush=True)
        if subprocess.run(command, cwd=root, env=environment).returncode != 0:
            print(f"rnnserve bench: {Path(command[-1]).name} failed", file=sys.stderr)
            return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or f"127.0.0.1:{os.environ.get('RNNSERVE_PORT', '50051')}"
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        print("--tls-cert-file and --tls-key-file: give both, or neither", file=sys.stderr)
        return 2
    if args.tls_ca_file:
        credentials = grpc.ssl_channel_credentials(
            args.tls_ca_file.read_bytes(),
            private_key=args.tls_key_file.read_bytes() if args.tls_key_file else None,
            certificate_chain=args.tls_cert_file.read_bytes() if args.tls_cert_file else None,
        )
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _score(args: argparse.Namespace) -> int:
    from serving.scoring.cli import score
    from serving.scoring.run import ScoreOptions

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    try:
        token = args.token_file.read_text().strip() if args.token_file else args.token
        tls = (read(args.tls_ca_file), read(args.tls_cert_file), read(args.tls_key_file))
    except OSError as error:
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    return score(ScoreOptions(
        model=args.model, input=args.input, output=args.output, models=args.models, version=args.version,
        server=args.server, engine=args.engine, input_format=args.input_format, output_format=args.output_format,
        text_column=args.text_column, id_column=args.id_column, probabilities=args.probabilities,
        batch_size=args.batch_size, concurrency=args.concurrency, timeout_s=args.timeout_s, retries=args.retries,
        on_error=args.on_error, rejects=args.rejects, token=token, tls_ca=tls[0], tls_cert=tls[1], tls_key=tls[2],
        ray_address=args.ray_address, device=args.device, progress=False if args.quiet else None,
    ))


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serving.errors import ModelLoadError
    from serving.grpc.front import choose_front
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
        print(f"error: {_setting_problems(error)}", file=sys.stderr)
        return 2
    try:
        choose_front(settings)  # --grpc-front native on settings it cannot serve: refused before any work
        settings.bearer_token()
        settings.server_credentials()
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if settings.workers > 1:
            from serving.workers import WorkerFailed, serve_workers

            worker_logging = functools.partial(
                configure_logging, args.log_level.upper(),
                "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s", args.log_format == "json",
            )
            try:
                return serve_workers(settings, worker_logging)
            except WorkerFailed as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
        return serve(settings)
    except (ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _setting_problems(error) -> str:
    """Each invalid setting named as its flag (and environment variable), with the value and the limit."""
    problems = []
    for problem in error.errors():
        name, *inner = problem["loc"] or ("settings",)
        where = f"--{str(name).replace('_', '-')} (RNNSERVE_{str(name).upper()})"
        if inner:
            where += " " + ".".join(map(str, inner))
        value = f" {problem['input']!r}:" if not isinstance(problem.get("input"), dict) else ""
        problems.append(f"{where}:{value} {problem['msg'].lower()}")
    return "; ".join(problems)


def _json_object(value: str) -> dict:
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"sentiment\": {\"instances\": 2}}'")
    return parsed


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


def _flag_bool(value: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (bool("false") would be True)."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: expected true or false")


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
    if args.command in ("score", "health"):
        configure_logging(logging.WARNING, "%(levelname)s %(name)s: %(message)s")
    elif args.command != "serve":
        configure_logging(logging.INFO, "%(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
