"""Transport layer: gRPC servicers, interceptors, health, reflection and the server lifecycle."""
