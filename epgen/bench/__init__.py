"""`epgen bench`: the normal and low-latency benchmarks (workers, measuring, report, plot).

The measuring code imports torch; the report reads and plots recorded JSON with matplotlib
(the `bench` extra, imported only when a plot is drawn).
"""
