#!/bin/sh
# Benchmark keychestamp: nginx-light upstream on loopback, Debian's hey as the load,
# direct vs through the proxy, alternated and repeated; see README.rst beside this file.
#
#   PYTHON=/path/to/venv/bin/python benchmarks/proxy.sh [--quick] [--direct-only]
#       [--variants [NAME=ARGS ...]] [--json PATH] [--help for all options]
#
# The orchestration is benchmarks/bench.py (standard library plus cryptography); it stops
# every process it started on exit, Ctrl-C and SIGTERM included.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHON
PATH=$PATH:/usr/sbin:/sbin
export PATH
for tool in nginx hey; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "proxy.sh: $tool not found; install Debian's nginx-light and hey:" >&2
        echo "  apt-get install -y nginx-light hey" >&2
        exit 2
    fi
done
if ! "$PYTHON" -c 'import cryptography' 2>/dev/null; then
    echo "proxy.sh: $PYTHON cannot import cryptography; set PYTHON to the python of the" >&2
    echo "  virtualenv where keychestamp is installed" >&2
    exit 2
fi
exec "$PYTHON" "$here/bench.py" "$@"
