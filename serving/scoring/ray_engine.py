"""`rnnserve score --engine ray`: the same scoring on Ray Data.

Ray reads the input (read_text / read_csv / read_json / read_parquet / read_binary_files),
`map_batches` runs an actor pool in which each actor holds one ONNX Runtime session of the
model (the version folder travels through Ray's object store, so cluster nodes need no copy
of the repository), and the driver writes the results in input order to the one output file,
with the same rows, ids and errors as a local run. `--ray-address` joins an existing cluster
(e.g. `ray://head:10001` of a KubeRay cluster); without it a local Ray starts, bound to loopback
only: its node address and every port it listens on are 127.0.0.1. A cluster's own network exposure
is that cluster's configuration.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

import numpy as np

from serving.scoring.engines import LocalEngine, Outcome, ScoringError
from serving.scoring.readers import InputError, Row, audio_files


def pack_version(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


class _Scorer:
    """One Ray actor: unpacks the model version and scores numpy batches with it."""

    def __init__(self, packed, model: str, version: str, audio: bool, id_column: str | None, text_column: str):
        root = Path(tempfile.mkdtemp(prefix="rnnserve-ray-"))
        folder = root / model / version
        folder.mkdir(parents=True)
        for name, content in packed.items():
            (folder / name).write_bytes(content)
        from serving.runtime import RuntimeOptions

        self.engine = LocalEngine(root, model, version, RuntimeOptions(intra_op_threads=1))
        self.audio, self.id_column, self.text_column = audio, id_column, text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = "bytes" if self.audio else self.text_column
        values = batch[column]
        rows = []
        for index, value in enumerate(values):
            row = Row(index, "", "")
            if self.audio:
                row.file = bytes(value)
            elif isinstance(value, str):
                row.text = value
            else:
                row.error = f"column {self.text_column!r} is {'null' if value is None else type(value).__name__}"
            rows.append(row)
        usable = [row for row in rows if row.error is None]
        scored = iter(self.engine.score(usable) if usable else [])
        outcomes = [Outcome(error=row.error) if row.error else next(scored) for row in rows]
        width = len(self.engine.labels)
        result = {
            "label": np.array([o.label or "" for o in outcomes], dtype=object),
            "score": np.array([o.score for o in outcomes], np.float32),
            "probabilities": np.stack([o.probabilities if o.probabilities is not None else np.zeros(width, np.float32)
                                       for o in outcomes]),
            "error": np.array([o.error or "" for o in outcomes], dtype=object),
        }
        if self.id_column:
            result["id"] = np.array([str(v) for v in batch[self.id_column]], dtype=object)
        if self.audio:
            result["path"] = batch["path"]
        return result


# Ray reads this switch when it is imported. Off (as on macOS and Windows), a local instance takes
# 127.0.0.1 as its node address, so Ray's GCS, raylet, object manager, agents and workers all listen
# on loopback; on Linux Ray otherwise takes the machine's network address and listens on every
# interface. `ray.init(_node_ip_address=...)` and RAY_NODE_IP_ADDRESS do not change that.
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(**init_options) -> None:
    """Start a new local Ray instance that listens on loopback only (and check that it does)."""
    os.environ[RAY_CLUSTER_SWITCH] = "0"  # for this process's import of Ray and for every process Ray starts
    import ray
    from ray._private import ray_constants

    # Where Ray was imported before the switch was set (a long-lived process, a test session), the
    # value it read then decides the node address: give it the same value.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", **init_options)
    node_address = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_address).is_loopback:
        ray.shutdown()
        raise ScoringError(f"the local Ray took node address {node_address}, not loopback; refusing to score "
                           "with ports open to the network (use --ray-address for a cluster)", 3)


class RayRun:
    def __init__(self, options, kind: str):
        if options.server:
            raise InputError("--engine ray scores with the model repository (--models), not a --server")
        if options.input == "-":
            raise InputError("--engine ray reads files, not stdin")
        if not options.ray_address:
            os.environ[RAY_CLUSTER_SWITCH] = "0"  # before Ray is imported: see start_local_ray
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise InputError("--engine ray needs Ray: pip install 'rnnserve[ray]'") from None
        self.options, self.kind = options, kind
        self.local = LocalEngine(options.models, options.model, options.version)  # checks the model, gives labels
        self._started = not ray.is_initialized()
        if self._started:
            quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if options.ray_address:
                ray.init(address=options.ray_address, **quiet)
            else:
                start_local_ray(**quiet)
        import logging

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def _dataset(self):
        import ray.data

        options, kind = self.options, self.kind
        path = options.input
        if kind == "txt":
            dataset = ray.data.read_text(path, drop_empty_lines=False)  # an empty line is a row, as locally
            options.text_column = "text"
        elif kind in ("csv", "tsv"):
            import pyarrow.csv

            parse = pyarrow.csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            convert = pyarrow.csv.ConvertOptions(strings_can_be_null=False, column_types={
                c: "string" for c in (options.text_column, options.id_column) if c})
            dataset = ray.data.read_csv(path, parse_options=parse, convert_options=convert)
        elif kind == "jsonl":
            dataset = ray.data.read_json(path, lines=True)
        elif kind == "parquet":
            dataset = ray.data.read_parquet(path)
        else:
            files = audio_files(path)
            root = Path(path) if Path(path).is_dir() else None
            # the ids a local run gives (relative to a folder, else as globbed), by resolved path
            self.audio_ids = {str(f.resolve()): str(f.relative_to(root)) if root else str(f) for f in files}
            dataset = ray.data.read_binary_files([str(f.resolve()) for f in files], include_paths=True)
        if kind != "audio":
            names = dataset.schema().names
            for wanted, option in ((options.text_column, "--text-column"), (options.id_column, "--id-column")):
                if wanted is not None and wanted not in names:
                    raise InputError(f"{path}: no column {wanted!r} ({option}); the file has {names}")
        return dataset

    def scored(self, batch_size: int):
        import ray
        import ray.data

        options = self.options
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        version = self.local.version
        # A few MB: sent along with each actor's constructor (no object-store lifetime to manage).
        packed = pack_version(version.path)
        # Leave one CPU for Ray's read tasks: actors holding every CPU would starve them.
        workers = options.concurrency or max(1, min(8, int(ray.cluster_resources().get("CPU", 2)) - 1))
        results = self._dataset().map_batches(
            _Scorer, fn_constructor_args=(packed, version.name, version.version, self.local.audio,
                                          options.id_column, options.text_column),
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
        )
        number = 0
        try:
            for batch in results.iter_batches(batch_size=batch_size, batch_format="numpy"):
                rows, outcomes = [], []
                for index in range(len(batch["label"])):
                    number += 1
                    if self.kind == "audio":
                        resolved = str(Path("/" + str(batch["path"][index]).lstrip("/")).resolve())
                        row_id = self.audio_ids.get(resolved, resolved)
                        where = resolved
                    else:
                        row_id = str(batch["id"][index]) if options.id_column else str(number)
                        line = self.kind in ("txt", "jsonl")  # rows are lines there, as a local run names them
                        where = f"{options.input}:{number}" if line else f"{options.input}:row {number}"
                    rows.append(Row(number, row_id, where))
                    error = str(batch["error"][index])
                    outcomes.append(Outcome(error=error) if error else Outcome(
                        str(batch["label"][index]), float(batch["score"][index]),
                        np.asarray(batch["probabilities"][index], np.float32)))
                yield rows, outcomes
        except ray.exceptions.RayError as error:
            raise ScoringError(f"Ray: {str(error).splitlines()[0][:500]}", 3) from None

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
