"""Tiny in-tree plugins for the plugin tests, and helpers to run the real ``nexus`` command.

The plugins are registered either in-process (``create_host(extra=[...])``) or through a
real ``nexus.plugins`` entry point of a fake installed distribution (see
:func:`tests.plugins.support.fake_distribution`).
"""
