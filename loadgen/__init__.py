"""mailstorm's SMTP load generator: ``mailstorm load`` / ``python -m mailstorm.load``.

The SMTP conversation itself is the sans-IO ``mailstorm.wire.client``; this package is the shell
around it: workload, schedule, trio sessions, measurement, reports and the command line.
"""
