"""Image classification as a pruning task: ``task`` (``ClassificationTask``: top-1 accuracy, exact CAR,
cross-entropy), ``cli`` (its evaluate / prune / export commands) and ``plugin`` (its registry entry)."""
