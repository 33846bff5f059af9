"""Tasks the RL job trains on: each turns observations into actor inputs and scores actions."""
