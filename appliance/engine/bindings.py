"""The one import of llama-cpp-python's ctypes bindings (pinned: the engine uses its low-level API and mtmd).

Every other engine module reaches llama.cpp through these two names, so the native surface has one door.
"""

import llama_cpp as llama_cpp
from llama_cpp import mtmd_cpp as mtmd_cpp
