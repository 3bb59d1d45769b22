"""``rerank-client eval``: ranking quality and latency of each stage on a BEIR dataset.

``datasets`` loads a BEIR split and indexes its corpus once, ``runner`` runs the chosen configurations for
every judged query, ``report`` turns the runs into measures, a table, JSON and a chart.
"""
