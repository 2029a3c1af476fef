"""The frozen base model: where it comes from, how it is loaded, and how text goes through it.

- `sources`: `--model` resolved to a Hugging Face directory (packaged models, GGUF files converted once
  and cached under the one cache root).
- `loading`: load, freeze and fingerprint a model; find the FFN output module every method edits.
- `batching`: tokenisation of prompt/answer pairs, padding, and teacher-forced forward passes.
- `tokenizer`, `tiny`: a small word-level tokenizer and tiny random models of every supported family
  (the tests' models, also `python -m moecli.model.tiny`).
"""
