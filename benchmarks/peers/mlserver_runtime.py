"""MLServer custom runtime serving the peer model with ONNX Runtime (adaptive batching is set
in model-settings.json: max batch 32, 5 ms; parameters.extra.intra_op_threads sets the session's
threads, 0 for ONNX Runtime's default). Runs in MLServer's own venv."""

from __future__ import annotations

import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxLstm(MLModel):
    async def load(self) -> bool:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int((self.settings.parameters.extra or {}).get("intra_op_threads", 0))
        self.session = onnxruntime.InferenceSession(self.settings.parameters.uri, options,
                                                    providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        ids = NumpyCodec.decode_input(payload.inputs[0]).astype(np.int64)
        logits = self.session.run(["logits"], {"ids": ids})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])
