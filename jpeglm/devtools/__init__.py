"""Tools for tests and benchmarks that simulate production conditions on one machine (an S3 latency/fault proxy,
a multi-node Ray cluster). Not used by the pipeline itself."""
