"""chunkjac's benchmarks: python -m benchmarks runs the suite (run.py); the other scripts run on their own."""
