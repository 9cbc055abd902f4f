"""Squeeze: a self-hosted model-compression server for teams."""
