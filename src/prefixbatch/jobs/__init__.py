"""Jobs: a batch file run through an executor (CLI ``run``, the server's batches) and the plan
report (CLI ``plan``). The formats they read and write live in ``io/``."""
