"""
The rate-limit ledger: what the proxy has seen of each ACME server's rate
limits, failing clients and expiring certificates, kept in SQLite in the
working directory and turned into derived events (``rate-limit-warning``,
``client-failing``, ``cert-expiring`` and their ``-cleared`` pairs) before the
CA refuses anything. Also the ``keychestamp report`` and ``keychestamp ledger
rebuild`` commands over audit files. See docs/ledger.rst.

Modules, in data-path order: buckets (token-bucket math, pure), limits (the
limit table, --limits, Let's Encrypt's values), domains (registered domains
and identifier sets), store (SQLite), engine (events in, state and derived
events out), ledger (the event sink and its timer), replay (reading audit
files), report (the two commands).
"""
