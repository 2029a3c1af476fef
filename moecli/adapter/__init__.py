"""What is added to the frozen model and how it is trained.

- `bypass`: the Mixture-of-Experts bypass beside one FFN output projection (the published methods' layer).
- `injection`: putting a bypass (or any wrapped layer) into a model and taking it out again.
- `training`: the one training loop every method uses.
"""
