"""One reconciliation run's steps as plain functions over an engine and a collection (no Dagster).

One module per step of RULES.md (`outbox`, `extract`, `diff`, `repair`, `cleanup`), the result
types they hand each other (`types`) and the audit rows of writes (`audit_rows`). The ops in
`ops.py` are thin wrappers that pass resources, the partition window and a logger.
"""
