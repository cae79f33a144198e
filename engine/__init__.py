"""The engineering a run needs: the command-line helpers, the experiment folder and its outputs, checkpoints,
the frames (in a worker process), the compiled training step, torchrun and the device, the 2D scores."""
