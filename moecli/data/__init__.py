"""Edit records and what is built from them, before any model is involved.

- `records`: the `EditRecord` type, validation, and reading/writing the supported file formats.
- `tables`: reading a file's rows (JSON, JSON Lines, gzip) with errors that name the line.
- `probes`: locality probes (same-subject probes, the relation test that keeps them honest) and the
  skeleton text of a prompt (its entity blanked) that routing compares.
"""
