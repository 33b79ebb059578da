"""Training package: data loaders, LSTM/GRU classifiers, the training loop and ONNX export."""
