"""The study layer: YAML schema and grid, one run end to end (experiment, parts), resume, attempt, run_study and
executors, results, report, export."""
