"""The HTTP/JSON transport: Cohere's and text-embeddings-inference's rerank APIs, TEI's and OpenAI's
embeddings APIs, health and info, served by uvicorn on the gRPC server's event loop and serving core."""
