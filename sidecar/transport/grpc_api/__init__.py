"""The gRPC transport: servicers, interceptors, the error-to-status table, health and reflection."""
