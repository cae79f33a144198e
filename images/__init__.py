"""Image support: MNIST and Fashion-MNIST IDX files, the U-Net, the image runs' defaults, the scoring classifier."""
