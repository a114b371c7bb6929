"""The control plane: deployment modes, metadata stores, sample files, rollout placements and the rollout worker."""
