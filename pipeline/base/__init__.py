"""The ground floor: errors, numbers, text, units, events, validation, files, subprocesses and
processes; imports nothing else of imagepipe.

Every other part of the package may import these modules; they import only each other and the
standard library.
"""
