"""The plain LSTM classifier all servers race on: vocab 20,000, embedding 128, hidden 256,
3 outputs; input `ids` INT64 [B, 64], output `logits` FP32 [B, 3]. Random weights (fixed seed):
speed does not depend on what the weights learned.

    python benchmarks/peer_model.py OUT_DIR     # writes OUT_DIR/lstm/1/model.onnx (needs torch)
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB, EMBEDDING, HIDDEN, CLASSES, STEPS = 20_000, 128, 256, 3, 64


def build(path: Path) -> Path:
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(VOCAB, EMBEDDING)
            self.lstm = torch.nn.LSTM(EMBEDDING, HIDDEN, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, ids):
            outputs, _ = self.lstm(self.embedding(ids))
            return self.head(outputs[:, -1])

    torch.manual_seed(0)
    model = Classifier().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, VOCAB, (2, STEPS))
    torch.onnx.export(model, (example,), str(path), input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def build_trivial(path: Path) -> Path:
    """The same tensors with no model behind them: logits = float(ids[:, :3]). Serving it shows
    what a server spends per request on everything but the model."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Slice", ["ids", "starts", "ends", "axes"], ["first"]),
         helper.make_node("Cast", ["first"], ["logits"], to=TensorProto.FLOAT)],
        "trivial", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", STEPS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
         helper.make_tensor("ends", TensorProto.INT64, [1], [CLASSES]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) / "lstm" / "1" / "model.onnx"))
