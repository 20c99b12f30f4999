"""The transport: the gRPC servicers and everything that happens to a call before and
after the service handles it (auth, rate limits, admission control, the audit log,
turning a StatusError into a gRPC status), and the API keys of a running server."""
