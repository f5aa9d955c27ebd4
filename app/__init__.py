"""Composition root: settings, the faust App, CLI, web views and the local broker tool."""

BYZGUARD_WORKER = True  # the `byzguard` script (byzguard._command) runs only an `app` package that says this
