"""The faust agents: thin loops that read state, call the core, write state and route."""
