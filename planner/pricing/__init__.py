"""Pricing: offer catalogs, the cost optimizer, live price refresh."""
