"""The ``atlas`` command line: the only code in modelatlas that prints or parses arguments."""
