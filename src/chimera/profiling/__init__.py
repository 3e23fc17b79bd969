"""`chimera profile`: measure a running OpenAI-compatible server and fit the engine model to it.

`client` measures (async httpx), `chimera.profiling.fit` fits (pure), `document` writes the profile YAML that a
cluster file's `profile_file:` entry (and `chimera emulate --profile FILE.yaml`) loads. See docs/profile.md.
"""

from chimera.profiling.client import MeasureError, Measurements, ProfileConfig, Profiler, measure
from chimera.profiling.document import ProfileResult, build_profile, write_profile

__all__ = ["MeasureError", "Measurements", "ProfileConfig", "ProfileResult", "Profiler", "build_profile", "measure",
           "write_profile"]
