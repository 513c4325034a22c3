"""The chaos suite: the worker fleet under provider faults, crashes and outages."""
