"""A local emulator of the Crisp people API (REST v1): real HTTP, real validation, real limits,
faults on demand. See CONTRACT.md in shared/crisp-api for what it is faithful to."""

from .app import Emulator, EmulatorConfig, TokenSpec
from .faults import FaultPlan, ForcedAnswer
from .server import RunningEmulator, serve_forever, start_in_thread

__all__ = ["Emulator", "EmulatorConfig", "FaultPlan", "ForcedAnswer", "RunningEmulator",
           "TokenSpec", "serve_forever", "start_in_thread"]
