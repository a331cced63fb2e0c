"""
The admin listener (--admin): a status page operators read at a glance,
the same data as JSON, Prometheus metrics and a health check.

An L{stats.AdminStats} event sink keeps a bounded summary of the events in
memory; L{metrics.AdminMetrics} turns the same events into counters on a
registry of its own; L{service.makeAdminService} serves both on an endpoint
of its own, never on the proxy's port, under the proxy's --allow ACL.
"""
