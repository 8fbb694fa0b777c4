"""What a load balancer needs of a node: readiness, liveness, capacity, drain (docs/fleet.md).

A fleet is ordinary sandboxd hosts behind HAProxy (or a Kubernetes Service); each node's
front process -- sandboxd-http, sandboxd-mcp with ``--http`` -- mounts these:

    node     the node as the balancer sees it, from the daemon's ``status``: ready or why not,
             the capacity numbers, the agent's word (``up ready N%``, ``drain``, ``down``); and
             the process's own drain (SIGTERM: no new work, what is in flight finishes)
    routes   GET /health/live, /health/ready, /capacity (Starlette routes)
    agent    HAProxy's agent-check port: one line per connection, from the same numbers

The daemon decides its own readiness (``status``: ``ready``, ``not_ready``, ``draining``);
a front process adds what only it knows (its own drain, its settings against the quota) and
says all of it in one place, so that /health/ready, /capacity and the agent never disagree.
"""
