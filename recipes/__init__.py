"""Runnable example recipes, installed as `mergekit_lite.examples` so `mlite demo` can use them."""
