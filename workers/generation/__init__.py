"""Dynamic-depth (early-exit) generation: a cached engine, its naive reference, latency model and profiler."""
