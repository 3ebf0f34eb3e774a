"""Memory planning: the peak memory per device of an experiment as configured, predicted offline before a job is
queued (`llmrepro plan`, `invoke slurm`); and out-of-memory failures recorded instead of lost.

    api           the plan of an experiment: offline model config, verdict, the smallest change that fits
    workloads     what each recipe runs on a device (model, step, batch, length, precision, DeepSpeed)
    measure       one step under FakeTensorMode: the real model code, nothing allocated, depth-extrapolated
    tracker       torch's MemTracker reduced to global and per-phase accounting (and a CPU memory cap)
    estimate      the measured step composed with ZeRO partitioning, offload, DDP, quantization, the reserve
    oom           memory caps, OOM snapshots, the outcome's figures
    architectures.json  the catalog's hub models' configs, for planning without the hub
"""
