#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite: set up (all extras), start the
# real PostgreSQL and Kafka the cloud tests talk to, run pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev train
bash scripts/services.sh start
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; fi
exit "$rc"
