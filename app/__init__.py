"""Composition root: settings, the faust App, CLI, web views and the local broker tool."""
