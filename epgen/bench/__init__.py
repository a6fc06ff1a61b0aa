"""`epgen bench`: the normal, low-latency and internode benchmarks (workers, measuring, report,
plot; the internode routing and byte counts).

The measuring code imports torch; the report reads and plots recorded JSON with matplotlib
(the `bench` extra, imported only when a plot is drawn).
"""
