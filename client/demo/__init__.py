"""The packaged demo: contract clauses (``clauses.jsonl``), golden questions (``golden.json``), and the
``rerank-client demo`` walkthrough that runs both stages on them."""
