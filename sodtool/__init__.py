"""sodtool: small object detection with a multi-task super-resolution GAN (SOD-MTGAN)."""

__version__ = "0.1.0"
