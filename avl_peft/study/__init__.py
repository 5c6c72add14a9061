"""The study layer: YAML schema and grid, one run end to end, resume, runner and executors, results, report."""
