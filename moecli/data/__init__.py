"""Edit records and what is built from them, before any model is involved.

- `records`: the `EditRecord` type and the checks a usable record passes.
- `readers`: the supported formats (ZsRE, CounterFact, hallucination, JSONL) read into records and written.
- `containers`, `tables`: the rows of a file (JSON, JSON lines, gzip; Parquet, CSV, `datasets` through
  `tables`), with errors that name the record.
- `probes`: locality probes (same-subject probes, the relation test that keeps them honest) and the
  skeleton text of a prompt (its entity blanked) that routing compares.
"""
