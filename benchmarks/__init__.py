"""fastprune benchmarks: each measures fastprune and its baselines in one run (see BENCHMARKS.md)."""
