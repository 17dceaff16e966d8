"""Benchmarks. Each script prints the machine it ran on with its figures."""
