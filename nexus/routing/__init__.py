"""Routing: the intent, the reconciler pipeline and the router."""
