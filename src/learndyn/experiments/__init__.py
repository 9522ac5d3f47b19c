"""Recipes that compose the library end to end (demo, replication, comparison); no math of their own."""
