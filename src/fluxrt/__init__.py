"""fluxrt: a runtime for the FLUX.2 family of image models (dev, klein 4B/9B) by Black Forest Labs."""

__version__ = "0.1.0"
