"""forge-factory: runs forge-alloy recipes through a durable on-disk line.

The package `factory` is the daemon side and must stay light: nothing in it
imports torch at module level. Stations (`stations/`) do the ML work inside a
part's child process.
"""

__version__ = "0.1.0"
