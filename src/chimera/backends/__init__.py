"""Real inference engines (vLLM CPU build) beside the emulator: model building, local clusters.

Imports nothing at package level: `chimera.backends.random_models` runs under the vLLM venv, without chimera's deps.
"""
