"""gRPC transport: servicers convert protobuf <-> data-plane calls; only this package imports grpc."""
