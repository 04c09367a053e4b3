"""Real-world test harness ("testbed") for integration tests and the demo.

- :mod:`.net`: :class:`TestNet`, network namespaces as test hosts on a private bridge;
- :mod:`.workload`: the sample service program that holds the sockets to checkpoint;
- :mod:`.criu`: start the workload as init of its own pid namespace, dump, restore, kill;
- :mod:`.probe`: client checks run inside a host namespace, with timeouts.

Everything here needs root, ``ip`` (iproute2), ``nsenter``/``unshare``/``setsid``
(util-linux) and, for :mod:`.criu`, CRIU 4.2.1 at ``/usr/local/sbin/criu``.
Only addresses inside 10.77.0.0/16, fd77::/64 and loopback are ever used.
"""

from .net import Host, TestNet
from .netns import TestNetError, cleanup_stale

__all__ = ["Host", "TestNet", "TestNetError", "cleanup_stale"]
