"""`python -m forge_rt.bench`: one benchmark suite for every machine forge_rt runs on (CPU server, CUDA GPU,
Jetson). Each case family (forge_rt/bench/cases/) measures forge_rt against its baseline in the same run and
returns rows of a versioned record (record.py) together with the machine it ran on (env.py)."""
