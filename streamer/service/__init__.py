"""The websocket service: protocol rules, server, per-connection sessions, the model scheduler, and
the client API."""
