"""The same models through the standard KServe v2 protocol, with unmodified tritonclient.

    pip install "tritonclient[grpc]"
    python examples/triton_client.py                       # sentiment on two texts
    python examples/triton_client.py --model topic "The striker scored twice."
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", default=["what a wonderful flight", "my bags were lost again"])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--model", default="sentiment")
    args = parser.parse_args()

    client = triton.InferenceServerClient(url=args.server)
    print("live", client.is_server_live(), "ready", client.is_server_ready(),
          f"{args.model} ready", client.is_model_ready(args.model))
    metadata = client.get_model_metadata(args.model)
    print("inputs", [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs],
          "outputs", [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs])

    text = triton.InferInput("text", [len(args.texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in args.texts], dtype=object))
    result = client.infer(args.model, [text])
    for sentence, label, probabilities in zip(
        args.texts, result.as_numpy("label"), result.as_numpy("probabilities"), strict=True
    ):
        print(f"{label.decode():<10} {np.round(probabilities, 3)}  {sentence}")

    # The keyword model takes FP32 audio [N, samples], mono, 16 kHz unless the request's
    # sample_rate_hz parameter says otherwise: here one second of silence.
    audio = triton.InferInput("audio", [1, 16000], "FP32")
    audio.set_data_from_numpy(np.zeros((1, 16000), np.float32))
    result = client.infer("keywords", [audio], outputs=[triton.InferRequestedOutput("label")])
    print("keywords on silence:", result.as_numpy("label")[0].decode())


if __name__ == "__main__":
    main()
