"""Where and how the model runs: the worker pool (``runtime.pool``)."""
