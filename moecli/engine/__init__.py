"""Jobs: a run of edits, its evaluation, and what they read and write.

- `run`: `run_edits` (edit, batch-edit, lifelong; resumable) and the adapter operations (load, ask, revert).
- `evaluation`: the metrics protocol (teacher-forced and free generation) and the unedited model's cache.
- `checkpoint`, `reports`: atomic adapter checkpoints and run reports.
- `calibration`, `planning`, `recipes`: question-key calibration, lifelong order planning, YAML recipes.
"""
