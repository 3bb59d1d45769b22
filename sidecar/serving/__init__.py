"""The serving core, free of any transport: model lifecycle, request logic for reranking, streams and
embeddings, usage, info and metrics."""
