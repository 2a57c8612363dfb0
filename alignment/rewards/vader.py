"""VADER sentiment as a reward: the external scorer of the PERL sanity task.

VADER (Hutto & Gilbert, 2014; PyPI ``vaderSentiment``) is a lexicon- and rule-based sentiment
scorer: no model, no download, and nothing this project wrote or trained. Its ``compound``
score is in [−1, 1] (−1 most negative, +1 most positive, 0 neutral). The sentiment recipe builds
preference pairs from the policy's own answers to neutral prompts ranked by this score, trains
the LoRA reward model on them, runs LoRA PPO against that reward model, and reports the mean
score of held-out answers before and after: if PPO optimises, the mean goes up although PPO
never saw VADER itself.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:  # a clear message at preflight, before any training
        raise ImportError("the VADER reward needs the PyPI package 'vaderSentiment': pip install vaderSentiment") from err
    return SentimentIntensityAnalyzer()


def reward(prompt: str, response: str) -> float:
    """VADER compound sentiment of the response, in [−1, 1] (the prompt is ignored)."""
    return float(_analyzer().polarity_scores(response or "")["compound"])
