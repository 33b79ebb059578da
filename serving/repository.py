"""The model repository: `<root>/<name>/<version>/{model.onnx, model.json, tokenizer.json}`.

Read once at start. A version that fails any check is recorded with the reason
and the rest keep loading; a model with no loadable version is not ready.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from serving.audio import LogMel
from serving.card import ModelCard
from serving.errors import ModelLoadError
from serving.onnx_files import self_contained
from serving.runtime import CPU_DEFAULTS, OnnxSession, RuntimeOptions
from serving.text import TextEncoder

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_FILE_BYTES = 2 * 1024**3


@dataclass
class ModelVersion:
    name: str
    version: str
    path: Path
    # model.onnx, one session per instance (they run concurrently, each on its own thread).
    sessions: list[OnnxSession]
    card: ModelCard | None = None
    encoder: TextEncoder | None = None
    frontend: LogMel | None = None
    # step.onnx of a streaming model (card.streaming says what it takes and returns), one per instance.
    step_sessions: list[OnnxSession] = field(default_factory=list)

    @property
    def session(self) -> OnnxSession:
        """The first instance: the graph's inputs, outputs and provider (every instance has the same)."""
        return self.sessions[0]

    @property
    def step_session(self) -> OnnxSession | None:
        return self.step_sessions[0] if self.step_sessions else None

    @property
    def task(self) -> str:
        return self.card.task if self.card else "tensor"

    @property
    def streaming(self) -> bool:
        return bool(self.step_sessions)


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    # version -> why it did not load
    failures: dict[str, str] = field(default_factory=dict)
    # why the model folder itself was refused (then no version is even looked at)
    problem: str = ""

    @property
    def ready(self) -> bool:
        return bool(self.versions)

    @property
    def reason(self) -> str:
        if self.ready:
            return ""
        if self.problem:
            return self.problem
        if not self.failures:
            return "no version folder (numeric name) found"
        return "; ".join(f"version {v}: {why}" for v, why in sorted(self.failures.items()))

    def version_names(self) -> list[str]:
        """Loaded versions, newest first."""
        return sorted(self.versions, key=int, reverse=True)


def _read_file(folder: Path, name: str, required: bool = True) -> bytes | None:
    """A regular file inside `folder`: no symlink, no extra hard link, bounded size."""
    if not name or name != Path(name).name or name in (".", ".."):
        raise ModelLoadError(f"{folder}: {name!r} is not a plain file name inside the model folder")
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if required:
            raise ModelLoadError(f"{path}: missing") from None
        return None
    except (OSError, ValueError) as error:  # a NUL byte, a name too long, a version "folder" that is a file
        raise ModelLoadError(f"{path}: cannot be read: {getattr(error, 'strerror', None) or error}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ModelLoadError(f"{path}: symbolic links are refused")
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{path}: not a regular file")
    if info.st_nlink > 1:
        raise ModelLoadError(f"{path}: files with more than one hard link are refused")
    if info.st_size > MAX_FILE_BYTES:
        raise ModelLoadError(f"{path}: {info.st_size} bytes, limit {MAX_FILE_BYTES}")
    return path.read_bytes()


def _sessions(folder: Path, name: str, runtime: RuntimeOptions) -> list[OnnxSession]:
    """One session per instance, from bytes checked once."""
    label = str(folder / name)
    model_bytes = self_contained(_read_file(folder, name), folder, label)
    return [OnnxSession(model_bytes, runtime, label=label) for _ in range(runtime.instances)]


def load_version(name: str, folder: Path, runtime: RuntimeOptions = CPU_DEFAULTS) -> ModelVersion:
    if folder.is_symlink():
        raise ModelLoadError(f"{folder}: symbolic links are refused")
    card_bytes = _read_file(folder, "model.json", required=False)
    card = None
    if card_bytes is not None:
        try:
            raw = json.loads(card_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{folder / 'model.json'}: not valid JSON: {error}") from None
        if isinstance(raw, dict) and raw.get("task"):
            try:
                card = ModelCard.model_validate(raw)
            except ValidationError as error:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
                )
                raise ModelLoadError(f"{folder / 'model.json'}: {problems}") from None
    sessions = _sessions(folder, "model.onnx", runtime)
    version = ModelVersion(name=name, version=folder.name, path=folder, sessions=sessions, card=card)
    if card is not None:
        _check_card_against_graph(version)
    if card is not None and card.streaming is not None:
        step_file = card.streaming.graph
        version.step_sessions = _sessions(folder, step_file, runtime.for_steps())
        _check_step_graph(version)
    if card is not None and card.preprocessing.kind == "log_mel":
        version.frontend = LogMel(card.preprocessing.frontend())
    elif card is not None:
        tokenizer_bytes = _read_file(folder, card.preprocessing.tokenizer_file)
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(tokenizer_bytes.decode("utf-8"))
        except Exception as error:  # tokenizers raises a bare Exception for bad files
            raise ModelLoadError(f"{folder / card.preprocessing.tokenizer_file}: cannot load: {error}") from None
        version.encoder = TextEncoder(tokenizer, card.preprocessing.max_tokens, card.preprocessing.pad_id)
    return version


def _check_card_against_graph(version: ModelVersion) -> None:
    card, session = version.card, version.session
    where = version.path / "model.json"
    declared = {spec.name: spec.dtype for spec in card.inputs}
    actual = {info.name: info.dtype for info in session.inputs}
    if declared != actual:
        raise ModelLoadError(f"{where}: inputs {declared} do not match the graph's {actual}")
    outputs = {info.name: info for info in session.outputs}
    if "logits" not in outputs:
        raise ModelLoadError(f"{where}: the graph has no 'logits' output (it has {sorted(outputs)})")
    width = outputs["logits"].shape[-1]
    if width != -1 and width != len(card.labels):
        raise ModelLoadError(f"{where}: {len(card.labels)} labels but the graph outputs {width} classes")


def _check_step_graph(version: ModelVersion) -> None:
    spec, session = version.card.streaming, version.step_session
    where = version.path / "model.json"
    declared = {t.name: t.dtype for t in spec.inputs}
    actual = {info.name: info.dtype for info in session.inputs}
    if declared != actual:
        raise ModelLoadError(f"{where}: streaming inputs {declared} do not match {spec.graph}'s {actual}")
    outputs = {info.name for info in session.outputs}
    missing = [t.name for t in spec.outputs if t.name not in outputs]
    if missing:
        raise ModelLoadError(f"{where}: {spec.graph} lacks the declared outputs {missing}")
    for state in spec.state:
        if state.name not in actual or state.output not in outputs:
            raise ModelLoadError(f"{where}: state {state.name} -> {state.output} is not in {spec.graph}")


def load_repository(
    root: Path, runtime: RuntimeOptions = CPU_DEFAULTS, only: set[str] | None = None,
    per_model: Mapping[str, RuntimeOptions] | None = None,
) -> dict[str, ModelEntry]:
    """Load every model under root (or those named in `only`); failures are recorded per
    version, never raised. `per_model` replaces `runtime` for the models it names."""
    if not root.is_dir():
        raise ModelLoadError(f"{root}: the model repository folder does not exist")
    per_model = per_model or {}
    for name in sorted(set(per_model) - {path.name for path in root.iterdir()}):
        log.warning("settings for model %s: the repository has no such model", name)
    entries: dict[str, ModelEntry] = {}
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        if only is not None and model_dir.name not in only:
            continue
        if not MODEL_NAME.match(model_dir.name):
            log.warning("skipping %s: not a valid model folder name", model_dir)
            continue
        if model_dir.is_symlink():  # reported not ready, never followed
            problem = f"{model_dir}: symbolic links are refused"
            entries[model_dir.name] = ModelEntry(name=model_dir.name, problem=problem)
            log.error("model %s not loaded: %s", model_dir.name, problem)
            continue
        entry = entries[model_dir.name] = ModelEntry(name=model_dir.name)
        for version_dir in sorted(model_dir.iterdir()):
            if not version_dir.name.isdigit():
                continue
            try:
                entry.versions[version_dir.name] = load_version(
                    model_dir.name, version_dir, per_model.get(model_dir.name, runtime)
                )
            except ModelLoadError as error:
                entry.failures[version_dir.name] = str(error)
                log.error("model %s version %s not loaded: %s", model_dir.name, version_dir.name, error)
            except Exception as error:  # a loader bug must cost this version, not the whole server
                log.exception("model %s version %s not loaded", model_dir.name, version_dir.name)
                entry.failures[version_dir.name] = f"{version_dir}: cannot load: {error.__class__.__name__}: {error}"
        if entry.ready:
            chosen = per_model.get(entry.name, runtime)
            log.info(
                "model %s: versions %s on %s, %d instance(s) x %s intra-op thread(s)", entry.name,
                ", ".join(entry.version_names()), entry.versions[entry.version_names()[0]].session.provider,
                chosen.instances, chosen.intra_op_threads or "default",
            )
    # Clients may read these reasons (UNAVAILABLE, ModelMetadata): paths relative to the
    # repository, so the server's file system layout stays in the server's log.
    for entry in entries.values():
        entry.problem = _relative(entry.problem, root)
        entry.failures = {version: _relative(why, root) for version, why in entry.failures.items()}
    return entries


def _relative(text: str, root: Path) -> str:
    for prefix in {str(root), str(root.absolute()), str(root.resolve())}:
        text = text.replace(prefix.rstrip("/") + "/", "")
    return text
