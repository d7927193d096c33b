"""The trainer: `config` (flags and files), `inputs` (data and retention text, checked and scrubbed),
`place` (the run directory), `memory` (plan, pager, RSS cap, monitor), `loop` (optimizer steps),
`checkpoint`, `run` (one run, orchestrated), `deliver` (export, seal, shred), `report`, `console` (progress,
signals). The command line is forge_rt.cli.train (`python -m forge_rt.train`)."""
