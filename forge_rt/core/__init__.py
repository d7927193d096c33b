"""The floor every layer stands on: errors, the native extension's loader, backend dispatch and the one
atomic-write helper. Imports nothing else of forge_rt."""
