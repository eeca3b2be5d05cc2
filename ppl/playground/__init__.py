"""``ppl playground``: a local page to write, run and share-screen ppl models in class.

The server (``server.py``, standard library ``http.server``) serves one static page
(``static/``: an editor with the DSL's highlighting, a data box, a method picker, Run,
the examples gallery) and runs models through ``Model.run`` in a worker process
(``worker.py``) with a time limit, caps on particles and samples, one run per model at
a time. It binds 127.0.0.1 unless told otherwise; nothing is loaded from the internet.
"""
from __future__ import annotations

import sys
import threading
import webbrowser

from .server import Limits, PlaygroundServer, serve

__all__ = ["Limits", "PlaygroundServer", "serve", "main"]


def main(host: str = "127.0.0.1", port: int = 8765, *, open_browser: bool = True,
         limits: Limits | None = None) -> int:
    """Serve until Ctrl-C (the ``ppl playground`` command)."""
    try:
        server = serve(host, port, limits=limits)
    except OSError as e:
        from ..semantics.errors import PPLError
        raise PPLError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                       hint="pick another port with --port (0 picks a free one)") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can run models here",
              file=sys.stderr)
    print(f"ppl playground on {server.url} (Ctrl-C to stop)", file=sys.stderr)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
