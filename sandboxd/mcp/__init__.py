"""sandboxd-mcp: sandboxd as a Model Context Protocol server, for agents (docs/mcp.md).

A client of the daemon's socket like any other, as its own unprivileged uid.  One module per
job, in the order a tool call meets them:

    main       the console script: settings, refusing root, stdio or HTTP
    web        Streamable HTTP: bearer tokens, the Origin and Host checks, bounded bodies,
               connections and sessions (a Starlette app with room for more routes)
    server     the MCP server (the official SDK's low-level one): tools, one workspace per MCP session
    workspace  the sandboxd sessions of one MCP session, a language each, opened at first use
    results    a cell's record as the agent reads it: text, figures, structured record, isError
    facts      what the sandbox has (Python, packages, Node, network), for the tool descriptions
    settings   declared once, as sandboxd's and sandboxd-http's

Only ``server``, ``web`` and ``main`` (once it starts serving) import the SDK (``pip install
"sandboxd[mcp]"``); the rest is plain sandboxd.
"""
