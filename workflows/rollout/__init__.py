"""The rollout workflows and rewards areal ships (RLVR, math-verify), and the trajectory and batch helpers."""
