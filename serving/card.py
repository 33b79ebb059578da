"""The model card `model.json`: a versioned schema that training writes and serving validates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_SCHEMA_VERSION = 1
TASKS = ("text_classification", "keyword_spotting")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: str = Field(description="ONNX element type name, e.g. int64 or float32")
    shape: list[int | str] = Field(description="an int per fixed axis, a name per dynamic one")


class TextPreprocessing(_Strict):
    kind: Literal["text"] = "text"
    tokenizer_file: str = "tokenizer.json"
    max_tokens: int = Field(gt=0, description="texts are truncated to this many tokens")
    pad_id: int = Field(0, ge=0)


class AudioPreprocessing(_Strict):
    """The log-mel frontend of serving.audio, with the parameters the model was trained with."""

    kind: Literal["log_mel"] = "log_mel"
    sample_rate_hz: int = Field(gt=0)
    window_samples: int = Field(gt=0)
    hop_samples: int = Field(gt=0)
    fft_size: int = Field(gt=0)
    mel_bands: int = Field(gt=0)
    low_hz: float = Field(ge=0)
    high_hz: float = Field(gt=0)
    log_floor: float = Field(gt=0)
    clip_samples: int = Field(gt=0, description="length of the clips the model was trained on")

    def frontend(self):
        from serving.audio import FrontendConfig

        return FrontendConfig(**self.model_dump(exclude={"kind", "clip_samples"}))


class Limits(_Strict):
    max_batch_size: int = Field(256, gt=0, description="most inputs in one request")
    max_text_chars: int = Field(4096, gt=0, description="most characters in one text")
    max_audio_seconds: float = Field(30.0, gt=0, description="longest audio clip in one request")


class ClassMetrics(_Strict):
    precision: float
    recall: float
    f1: float
    support: int


class EvaluationMetrics(_Strict):
    split: str
    examples: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics] = {}
    confusion_matrix: list[list[int]] = []


class DataInfo(_Strict):
    source: str
    digest: str
    examples: int
    split: dict[str, int | float | str | list[float]] = Field(
        description="split method, seed, fractions and part sizes"
    )
    deduplication: dict[str, int | float | str] | None = Field(
        None, description="duplicates removed before splitting: texts before, exact and near copies removed, "
        "the near-copy similarity threshold and the method"
    )


class SeedRun(_Strict):
    seed: int
    run: str
    validation_accuracy: float
    validation_macro_f1: float
    test_accuracy: float
    test_macro_f1: float


class SeedSummary(_Strict):
    """The same recipe trained with several seeds on the same split; the shipped weights are the
    seed chosen on validation, and the means say what the recipe gives."""

    seeds: list[int]
    chosen_seed: int
    chosen_on: str
    validation_accuracy_mean: float
    validation_accuracy_std: float = Field(description="sample standard deviation over the seeds")
    validation_macro_f1_mean: float
    validation_macro_f1_std: float
    test_accuracy_mean: float
    test_accuracy_std: float
    test_macro_f1_mean: float
    test_macro_f1_std: float
    training_seconds_total: float
    per_seed: list[SeedRun]


class ExportInfo(_Strict):
    exporter: str
    opset: int
    torch_version: str
    onnxruntime_version: str
    parity_max_abs_diff: float
    parity_examples: int
    parity_labels_identical: bool


class StateSpec(_Strict):
    """One state tensor of step.onnx, like Triton's implicit state: fed back every step."""

    name: str = Field(description="input name of the state")
    output: str = Field(description="output name that carries the updated state")
    dtype: str = "float32"
    shape: list[int] = Field(description="per stream; the batch axis comes first and is not listed")
    initial: float = Field(description="every element's value before the first chunk")


class StreamingSpec(_Strict):
    graph: str = "step.onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StateSpec]
    parity_max_abs_diff: float = Field(
        description="largest difference between chunked and one-shot logits seen at export"
    )
    parity_sequences: int


class QuantizationInfo(_Strict):
    """model.int8.onnx measured against model.onnx on the whole test split at export."""

    method: str
    quantized_ops: list[str]
    shipped: bool = Field(description="whether model.int8.onnx is in the folder")
    file: str | None = None
    examples: int
    accuracy: float
    fp32_accuracy: float
    us_per_example: float = Field(description="wall time per test example, CPU, batches of 64")
    fp32_us_per_example: float
    speedup: float
    size_bytes: int
    fp32_size_bytes: int
    note: str = ""


class ModelCard(_Strict):
    schema_version: Literal[1] = CARD_SCHEMA_VERSION
    name: str
    task: Literal["text_classification", "keyword_spotting"]
    description: str = ""
    labels: list[str] = Field(min_length=2)
    architecture: dict[str, int | float | str | bool]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: TextPreprocessing | AudioPreprocessing = Field(discriminator="kind")
    # Present when the version ships step.onnx (unidirectional models).
    streaming: StreamingSpec | None = None
    int8: QuantizationInfo | None = None
    limits: Limits = Limits()
    metrics: EvaluationMetrics
    # Several seeds of the recipe (`rnnserve train --seeds N`): metrics above are the chosen seed's.
    seeds: SeedSummary | None = None
    # Further evaluations, e.g. held-out clips of training voices or streamed test audio.
    evaluations: dict[str, EvaluationMetrics] = {}
    # Keyword detection on long streamed recordings (training/stream_eval.py): operating points
    # of the detector, the server's stream defaults among them.
    detection: dict | None = None
    baseline: EvaluationMetrics | None = None
    baseline_method: str = ""
    data: DataInfo
    training_command: str
    training_seconds: float
    git_revision: str | None = None
    export: ExportInfo
    created_at: str

    def detector_defaults(self) -> dict:
        """Detector settings of the card's default operating point ({} when it has none)."""
        if not self.detection:
            return {}
        budget = self.detection.get("default_budget_per_hour")
        for point in self.detection.get("operating_points", []):
            if point.get("false_alarm_budget_per_hour") == budget:
                return dict(point.get("detector", {}))
        return {}

    @model_validator(mode="after")
    def _labels_unique(self) -> ModelCard:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        defaults = self.detector_defaults()
        if defaults:
            from serving.detector import DetectorConfig
            from serving.errors import InvalidInput

            try:
                DetectorConfig.from_settings(defaults).checked(self.labels)
            except (InvalidInput, TypeError, ValueError) as error:
                raise ValueError(f"detection: the default operating point's detector: {error}") from error
        expected = "text" if self.task == "text_classification" else "log_mel"
        if self.preprocessing.kind != expected:
            raise ValueError(f"task {self.task} needs preprocessing kind {expected!r}")
        return self
