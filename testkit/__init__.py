"""What the tests and the benchmarks share: tiny random-weight models and the model cards' prompts.

The sidecar and the client never import it, and it is not packaged: it is imported from a checkout.
"""
