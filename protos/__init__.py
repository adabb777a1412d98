"""Wire protocol shared by engines (embedded, SGLang plugin, simulator) and the planner."""

from protos.messages import *  # noqa: F401,F403  (the protocol is one flat namespace)
from protos.messages import __all__  # noqa: F401
