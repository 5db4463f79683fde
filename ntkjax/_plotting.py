"""Matplotlib, imported only when a plot is asked for (it is optional)."""

from __future__ import annotations


def pyplot():
  """`matplotlib.pyplot`, or an ImportError that says how to get it."""
  try:
    import matplotlib.pyplot as plt
  except ImportError as error:
    raise ImportError(
        'Plotting needs matplotlib: pip install matplotlib') from error
  return plt


def axes(ax=None, figsize=(5, 4)):
  """`ax`, or the Axes of a new figure of `figsize`."""
  if ax is None:
    _, ax = pyplot().subplots(figsize=figsize)
  return ax
