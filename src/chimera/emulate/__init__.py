"""An OpenAI-compatible emulated vLLM backend driven in real time by the discrete-event engine model (no GPU)."""

from chimera.emulate.clock import EngineClock, Handle, cancel_seq
from chimera.emulate.server import build_emulator_app
from chimera.emulate.runner import EmulatorServer, running_emulator, serve_emulator

__all__ = ["EngineClock", "Handle", "cancel_seq", "build_emulator_app", "EmulatorServer", "running_emulator",
           "serve_emulator"]
