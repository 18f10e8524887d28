"""The HTTP API's routers, one per concern: service (health, metrics), loras (read, delete, import), jobs
(training submissions), generate, profile. Each reads the replica's state through `serve.middleware.ctx()`."""
