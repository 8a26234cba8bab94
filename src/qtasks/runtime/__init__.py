"""What runs tasks: the worker, the executor of one task, the starter that owns the process."""
