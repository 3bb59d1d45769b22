"""Stage 1: retrievers behind one interface (``Retriever``), Elasticsearch or embedded."""
