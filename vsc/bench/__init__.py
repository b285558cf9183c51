"""Benchmarking compiled servers and their peers on this machine.

    workloads  seeded, deterministic requests (chat, shared-prefix, code-edit, json) + arrivals
    loadgen    async streaming OpenAI-compatible load client (open and closed loop, loopback only)
    metrics    TTFT / TPOT / ITL / E2E, throughputs and goodput as `vllm bench serve` defines them
    floor      this machine's bandwidth and matmul rate, and the least time of a decode step
    plots      latency CDFs and throughput-vs-rate PNGs
    cli        `vsc bench SERVER_DIR ...`
"""
