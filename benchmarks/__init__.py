"""Development tools outside the pipeline and its tests: the load benchmark (`make bench`, `make bench-shards`) and the synthetic data generator."""
