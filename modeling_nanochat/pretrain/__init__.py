"""Stage: pretraining (Accelerate or DeepSpeed), sweeps and the run report."""
