"""The command lines, thin over the layers below: `python -m forge_rt.X` runs `forge_rt.cli.X.main`.
Each parses its flags with no optional extra imported (so `--help` works on a base install) and runs its
work through `common.run_command` (offline guard, one `error:` line, exit 2)."""
