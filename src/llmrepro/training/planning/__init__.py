"""Memory planning: the peak memory per device of an experiment as configured, predicted offline, before a job
is queued; and out-of-memory failures recorded instead of lost.

    tracker    MemTracker (torch) reduced to global and per-phase accounting
    measure    one step under FakeTensorMode: the real model code, no allocation, depth-extrapolated
    oom        memory caps, OOM detection and memory snapshots for runs
"""
