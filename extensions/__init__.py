"""What later papers added to DDPM, each called from ddpm.py by one named call: DPM-Solver++ (dpm_solver.py),
timestep spacings (spacing.py), guidance (guidance.py), Min-SNR loss weights (min_snr.py)."""
