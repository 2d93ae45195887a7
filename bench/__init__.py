"""guardchat benchmarks (issue 7). Each module runs with one command, e.g. `python -m bench.pipeline_overhead`;
see docs/benchmarks.md for what each measures and the latest results."""
