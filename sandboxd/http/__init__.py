"""sandboxd-http: the dify-sandbox HTTP API in front of the daemon, as an unprivileged uid.

One module per job, in the order a request meets them:

    guard      slow and oversized clients (on top of uvicorn's parser)
    gate       which connections stay open: pending heads apart, per client address, room kept for the key
    keys       the API key, checked once for the routes and the gate
    app        routes, the API key, bodies; one answer per request
    service    admission (MAX_REQUESTS, MAX_WORKERS), the run, health, dependencies
    dify       Dify's wire format: the request, the envelope, the words of an error
    upstream   the connections to the daemon (a pool of sandboxd.client.AsyncClient)
    metrics    Prometheus exposition
    settings   declared once; file, dify-sandbox's environment names, command line
    main       start-up and the console script
"""
