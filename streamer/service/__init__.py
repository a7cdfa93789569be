"""The websocket service: protocol rules, server, per-connection sessions, the model executor, and
the client API."""
