"""Imported by the fork server the launcher's workers fork from (launch.py preloads it), never
by the launcher or a worker itself.

multiprocessing hands each forked worker the server's liveness pipe, so the server outlives a
launcher killed with SIGKILL as long as a worker lives, and a worker's PDEATHSIG names the server,
not the launcher. Tying the server to the launcher closes the chain: the launcher dies, the kernel
kills the server, then every worker. Stop signals are the launcher's to handle (it ends the
workers and says so); a terminal's SIGHUP or a service manager's SIGTERM to the whole group would
otherwise kill the server first and the workers with it, before the launcher could.
"""

from __future__ import annotations

import signal

from giantpipe.platform.launch import die_with_parent

die_with_parent()
for _signum in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_signum, signal.SIG_IGN)
