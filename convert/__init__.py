"""PyTorch -> Flax checkpoint conversion: a strict rule engine (`rules`), readers (`io`), per-model tables."""
