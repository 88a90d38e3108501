"""Benchmarks as plug-ins (``clearsight.evals.benchmarks.base``): importing this package registers the
built-ins, in the order the report lists them. A benchmark of your own: subclass ``Benchmark``, decorate
it with ``register_benchmark`` and import its module before the job is parsed (docs/evals.md)."""

from clearsight.evals.benchmarks import amber, chair, crosscheck, mme, pope  # noqa: F401 - registers the built-ins
from clearsight.evals.benchmarks.base import (
    Benchmark,
    BenchmarkScore,
    BenchmarkSpec,
    DataFile,
    ScoreContext,
    benchmark_class,
    register_benchmark,
    registered,
)

__all__ = ["Benchmark", "BenchmarkScore", "BenchmarkSpec", "DataFile", "ScoreContext", "benchmark_class",
           "register_benchmark", "registered"]
