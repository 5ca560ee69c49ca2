"""The ``mailstorm`` command: dispatches to the sink, the load generator and small tools."""
