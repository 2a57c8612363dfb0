"""Reward functions ``reward(prompt, response) -> float`` usable in recipes as ``alignment.rewards.<module>:<function>``."""
