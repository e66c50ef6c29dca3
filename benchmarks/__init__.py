"""Throughput benchmarks for every stage (shard build, loading, training), each next to its baseline and limit."""
