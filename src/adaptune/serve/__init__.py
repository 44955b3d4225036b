"""``adaptune serve``: many task adapters over HTTP on one base model, with mixed-task batching.

:class:`Engine` holds the model and the batcher; :func:`create_app` is the ASGI application;
:func:`run` serves it with uvicorn until SIGTERM or Ctrl-C (then it stops accepting, finishes the
requests in flight and what is queued, and returns).
"""

from __future__ import annotations

from adaptune.serve.app import Limits, create_app
from adaptune.serve.engine import Engine, QueueFull, UnknownTask

__all__ = ["Engine", "Limits", "QueueFull", "UnknownTask", "create_app", "run"]


def run(app, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 30.0) -> None:
    """Serve ``app`` with uvicorn until SIGTERM or Ctrl-C, then stop gracefully and return (access
    lines come from the app's own log, not uvicorn's). Called from the main thread it handles those
    two signals while it runs (uvicorn's handlers), and puts the previous handlers back after."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # a graceful stop is the expected end: return (exit 0), do not re-raise the signal
            self._captured_signals.clear()

    config = uvicorn.Config(
        app, host=host, port=port, access_log=False, timeout_graceful_shutdown=graceful_s, log_level="warning"
    )
    Server(config).run()
