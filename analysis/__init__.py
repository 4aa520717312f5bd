"""Analysis jobs: generation, rollouts, link tables, sweeps, plots and reports."""
