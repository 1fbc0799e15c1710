"""TFDS builders of every dataset `run.py prepare` knows (docs/data.md#2-raw-datasets).

Importing this package registers them with TFDS (`tfds.builder("refcoco")`, `tfds.data_source(...)`).
"""

from data_pipelines.tfds_builders.evf import (  # noqa: F401
    BUILDERS,
    CUSTOM_NAME,
    FEATURES,
    VERSION,
    EvfBuilder,
    Synthetic,
    builder_class,
    builder_name,
    custom_builder,
    custom_name_problem,
    example_to_record,
    prepare_command,
    record_to_example,
)
