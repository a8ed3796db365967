"""Perceiver AR in Flax with a T5X-style, gin-configured trainer."""

__version__ = "0.1.0"
