"""Run the whole service on one machine with embedded defaults (``make run``), and start its parts for
tests and benchmarks. Imports api, worker and services only by starting them as processes."""
