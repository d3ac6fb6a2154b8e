"""Bundled, real examples that need no download (see :mod:`seapig_core.examples.digits`)."""
