"""Task data: sources (files, folders, the hub), the GLUE table, splits and encoding, batches, metrics."""

# what adaptune.data held before it became a package
from adaptune.data.batching import bucket_batches, collate, encode
from adaptune.data.loading import Split, TaskData, load_task_data, seeded_subset

__all__ = ["Split", "TaskData", "bucket_batches", "collate", "encode", "load_task_data", "seeded_subset"]
