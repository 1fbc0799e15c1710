"""Dataset readers, record preparation and grain input pipelines."""
