"""Small helpers every stage uses, defined once: quiet converter output, package versions,
host description, timing loops, timestamps. Stages import them from here, never from each
other. Torch-free and engine-free. Importing it also registers common.embed (writing a bundle's
description into its model file) with runtime.bundle."""
from common.util import (cpu_flags, cpu_model, host_info, host_string, now, package_versions,
                         quiet, time_calls, time_interleaved, time_rounds)

from common import embed as _embed  # noqa: E402,F401 - registers the embedder

__all__ = ["cpu_flags", "cpu_model", "host_info", "host_string", "now", "package_versions", "quiet",
           "time_calls", "time_interleaved", "time_rounds"]
