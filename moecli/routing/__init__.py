"""Which edit, if any, an input reaches.

- `context`: the per-forward routing state (`AnchorContext`) and how a caller declares what it feeds.
- `anchors`: the subject trie (which span of an input names an edited entity) and the FAISS anchor store.
- `keys`: the key matcher (the same entity and the same question as a stored edit).
- `routers`: knowledge-anchor, KV-anchor and indexing-neuron routers the bypass asks.
- `question`: the learned question key (a small encoder calibrated per model) and its capture hook.
- `sentence`: the packaged sentence embedder a text key reads.
"""
