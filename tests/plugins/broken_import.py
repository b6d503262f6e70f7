"""A plugin whose import fails: it must be reported and skipped, never stop Nexus."""

raise RuntimeError("broken on purpose at import")
