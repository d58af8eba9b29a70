"""Search strategies: greedy block removal, evolutionary search over per-layer rates, ratio assignment."""
