"""hpcnoise: large-batch SGD with structured curvature noise, on clusters."""

__version__ = "0.1.0"
