"""Whole studies: the orchestration that runs every stage on a subject and hands back one report (`demo` runs it
on the built-in organisms).

The top of the library below the CLI: it may import every stage.
"""
