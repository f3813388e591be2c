import sys

from ..signals import stop_on_signals

stop = stop_on_signals()  # before the heavy imports: a SIGTERM while starting is a clean stop

from .worker import main  # noqa: E402

sys.exit(main(stop))
