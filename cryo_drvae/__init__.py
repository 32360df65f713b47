"""cryo-drvae: unsupervised 2D classification of cryo-EM particles (DRVAE + BSK-means++)."""

__version__ = "0.1.0"
