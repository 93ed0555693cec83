"""Models: named UNet configurations for the denoisers, and the MNIST judge used to score their samples."""
